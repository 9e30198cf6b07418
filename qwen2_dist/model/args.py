"""Qwen2 sizes as data: the published configurations plus small sizes that train on a CPU."""

import math
from dataclasses import asdict, dataclass, replace

from qwen2_dist.errors import UserError

INERT_ARGS = ("initializer_range", "max_position_embeddings")
"""ModelArgs fields that change no weight and no computation of a training step (the random init's scale; the
context length a checkpoint's config.json advertises, RoPE being computed for the positions used): weights of
another value of these load into the model as they are."""


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of one Qwen2 model; field names follow transformers' Qwen2Config."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self, field: str = "model") -> None:
        """Raise UserError when the sizes cannot form a Qwen2 model."""
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads"):  # before dividing by them
            if getattr(self, name) <= 0:
                raise UserError(f"{field}: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"{field}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides the hidden size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"{field}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise UserError(f"{field}: head_dim {self.head_dim} is odd; rotary embeddings need an even head_dim")
        for name in ("vocab_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
                     "rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            # not (value > 0) refuses nan too; an infinite rope_theta or initializer_range makes nan logits.
            if not (0 < value < math.inf):
                raise UserError(f"{field}: {name} must be a positive finite number, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


# The Qwen2 base models (Qwen2 model cards / config.json); the debug sizes keep the real vocabulary so that the
# real tokenizer feeds them, and shrink everything else until a CPU trains them in minutes.
SIZES: dict[str, ModelArgs] = {
    "qwen2-0.5b": ModelArgs(
        vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
    ),
    "qwen2-1.5b": ModelArgs(
        vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True,
    ),
    "qwen2-7b": ModelArgs(
        vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False,
    ),
    "qwen2-72b": ModelArgs(
        vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=29568, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    # Small enough for multi-process tests on two cores, with the real vocabulary.
    "tiny": ModelArgs(
        vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    "debug": ModelArgs(
        vocab_size=151936, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=384, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
}


def get_model_args(name: str, **overrides) -> ModelArgs:
    """The ModelArgs of a named size, with optional field overrides."""
    if name not in SIZES:
        raise UserError(f"model.name: unknown size {name!r}; choose one of {', '.join(sorted(SIZES))}")
    args = replace(SIZES[name], **overrides) if overrides else SIZES[name]
    args.check(f"model={name}" + "".join(f" model.{key}={value}" for key, value in overrides.items()))
    return args
