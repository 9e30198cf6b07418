"""The typed schema of a job (registered in Hydra's ConfigStore) and validate(), which refuses impossible jobs early."""

import os
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from qwen2_dist.errors import UserError


@dataclass
class ModelConfig:
    name: str = "debug"
    """Size from qwen2_dist.model.args.SIZES: debug, qwen2-0.5b, qwen2-1.5b, qwen2-7b, qwen2-72b."""
    attention: str = "auto"
    """Attention backend: auto (flash-attn if importable on CUDA, else SDPA), flash_attn, sdpa, reference."""
    init_from_hf: Optional[str] = None
    """Hugging Face Qwen2 directory (config.json + safetensors) whose weights start the run instead of init_weights."""
    hidden_size: Optional[int] = None
    """Override of the named size's field (null keeps it); the same for the fields below."""
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    max_position_embeddings: Optional[int] = None

    def args(self):
        """The ModelArgs of this config: the named size with the non-null overrides applied and checked."""
        from qwen2_dist.model.args import get_model_args

        fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings")
        overrides = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        return get_model_args(self.name, **overrides)


@dataclass
class DataConfig:
    path: Optional[str] = None
    """MDS shard directory written by qwen2-prepare (local path or remote URL); null = the embedded default corpus."""
    cache_dir: Optional[str] = None
    """Local cache for a remote data.path, and where the embedded corpus is built; default ~/.cache/qwen2_dist."""
    shuffle: bool = True
    """Shuffle samples (deterministically, from the run seed)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    embedded_max_tokens: int = 4_000_000
    """Tokens taken from the Python standard library sources for the embedded default corpus."""


@dataclass
class TrainConfig:
    steps: int = 150
    """Optimizer steps of the whole run (a resumed run continues up to this count)."""
    stop_at: Optional[int] = None
    """Stop after this step with a checkpoint, without changing the schedule (chunked jobs, resume tests)."""
    seq_len: int = 128
    """Tokens per sample; must equal the sample length the shards were prepared with."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks; the rest comes from gradient accumulation."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU)."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on biases, norms or embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused: str = "auto"
    """auto (fused AdamW on CUDA), true or false."""


@dataclass
class CheckpointConfig:
    interval: int = 50
    """Save every this many steps (0 = only at the end)."""
    keep_last: int = 2
    """Committed checkpoints kept; older ones are deleted after a new commit."""
    resume: str = "auto"
    """auto (newest committed checkpoint in run_dir/checkpoints), none, or a checkpoint directory."""
    save_final: bool = True
    """Save when the run reaches train.steps."""


@dataclass
class LoggingConfig:
    interval: int = 5
    """Log (console and metrics.jsonl) every this many steps."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP); parameters are replicated across this axis."""
    dp_shard: int = -1
    """Data-parallel shards (FSDP2); -1 = whatever the world size leaves."""
    tp: int = 1
    """Tensor-parallel degree."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/default"
    """Where metrics.jsonl, config.yaml, logs and checkpoints/ go; the same run_dir resumes the run."""
    seed: int = 0
    """Seed of the weight init and the data order."""


def register_configs() -> None:
    """Register the schema so Hydra type-checks conf/ and the command-line overrides."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)


def validate(cfg: JobConfig, world_size: int) -> dict[str, int]:
    """Refuse impossible jobs before any tensor is allocated; return the resolved layout and accumulation steps."""
    args = cfg.model.args()
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    for name, value in (
        ("train.steps", t.steps), ("train.seq_len", t.seq_len), ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size), ("logging.interval", cfg.logging.interval),
        ("parallel.dp_replicate", p.dp_replicate), ("parallel.tp", p.tp),
    ):
        if value <= 0:
            raise UserError(f"{name}={value}: must be a positive integer")
    if o.lr <= 0:
        raise UserError(f"optim.lr={o.lr}: the learning rate must be positive")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio={o.min_lr_ratio}: must lie in [0, 1]")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise UserError(f"optim.warmup_steps={o.warmup_steps}: must lie in [0, train.steps={t.steps}]")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 turns clipping off)")
    if cfg.checkpoint.interval < 0 or cfg.checkpoint.keep_last < 1:
        raise UserError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
    if t.seq_len > args.max_position_embeddings:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds the {args.max_position_embeddings} positions of "
            f"model={cfg.model.name}; lower train.seq_len"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device={t.device!r}: choose auto, cpu or cuda")
    if t.mixed_precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.mixed_precision={t.mixed_precision!r}: choose auto, bf16 or fp32")
    if o.fused not in ("auto", "true", "false", True, False):
        raise UserError(f"optim.fused={o.fused!r}: choose auto, true or false")
    if p.tp > 1:
        raise UserError(
            f"parallel.tp={p.tp}: tensor parallelism is not available in this release; set parallel.tp=1"
        )
    if p.dp_shard == -1:
        if world_size % (p.dp_replicate * p.tp):
            raise UserError(
                f"world size {world_size} is not divisible by parallel.dp_replicate x parallel.tp = "
                f"{p.dp_replicate * p.tp}; change the layout or the number of processes"
            )
        dp_shard = world_size // (p.dp_replicate * p.tp)
    else:
        dp_shard = p.dp_shard
        if dp_shard <= 0 or p.dp_replicate * dp_shard * p.tp != world_size:
            raise UserError(
                f"parallel.dp_replicate x dp_shard x tp = {p.dp_replicate} x {p.dp_shard} x {p.tp} does not equal "
                f"the world size {world_size}; set parallel.dp_shard=-1 to fill the rest"
            )
    dp = p.dp_replicate * dp_shard
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp}; pick a global batch that is a multiple of "
            f"{t.micro_batch_size * dp}"
        )
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise UserError(f"checkpoint.resume={resume}: no such checkpoint directory; use auto, none or an existing path")
    if cfg.model.init_from_hf is not None and not os.path.isdir(cfg.model.init_from_hf):
        raise UserError(f"model.init_from_hf={cfg.model.init_from_hf}: no such directory")
    if cfg.data.path is not None and "://" not in cfg.data.path and not os.path.isdir(cfg.data.path):
        raise UserError(
            f"data.path={cfg.data.path}: no such directory; write shards with qwen2-prepare input=... output=DIR "
            "or leave data.path unset for the embedded corpus"
        )
    return {
        "dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "tp": p.tp,
        "grad_accum_steps": t.global_batch_size // (t.micro_batch_size * dp),
    }
