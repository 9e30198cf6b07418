"""Hugging Face Qwen2 checkpoints (config.json + safetensors) to and from the native model and its state dict."""

import glob
import json
import logging
import mmap
import os
import shutil
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import OutputTaken, chmod_as_created, fsync_path, new_output_dir, publish_dir, replace_dir
from qwen2_dist.model.args import INERT_ARGS, ModelArgs
from qwen2_dist.model.qwen2 import Qwen2, build_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# <|endoftext|> in the Qwen2 tokenizer; the published base models use it as both bos and eos.
QWEN2_EOS_TOKEN_ID = 151643
GENERATION_CONFIG_NAME = "generation_config.json"
# Fields of a source checkpoint's config.json that change no weight and no training step, kept for the export:
# an Instruct model's eos (<|im_end|>), a Qwen2.5 model's advertised context (32768, not the size's 131072).
SOURCE_KEYS = ("max_position_embeddings", "bos_token_id", "eos_token_id")

# Defaults of transformers' Qwen2Config for keys a config.json may omit; the file means what transformers reads.
_HF_DEFAULTS = {
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
}
_SIZE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
)
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "initializer_range")


def _refuse(file: str, key: str, value: object, fix: str) -> UserError:
    """The error for a config.json value the native model does not implement."""
    return UserError(f"{file}: {key}={json.dumps(value)} is not supported by the native Qwen2 model; {fix}")


def args_from_hf_config(config: dict, file: str = CONFIG_NAME) -> ModelArgs:
    """ModelArgs for a transformers Qwen2 config.json dict; refuses features the native model does not implement."""
    if config.get("model_type") != "qwen2":
        raise _refuse(file, "model_type", config.get("model_type"), "only Qwen2 checkpoints (model_type 'qwen2') load")
    architectures = config.get("architectures")
    if architectures is not None and architectures != ["Qwen2ForCausalLM"]:
        raise _refuse(file, "architectures", architectures, "only Qwen2ForCausalLM checkpoints load")
    # transformers maps both names to the same SiLU.
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _refuse(file, "hidden_act", config["hidden_act"], "the MLP is SwiGLU with silu")
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise _refuse(file, "layer_types", layer_types, "every layer must be 'full_attention'")
    windowed = "" if layer_types or not config.get("use_sliding_window", False) else _windowed_layers(file, config)
    if windowed:
        raise _refuse(file, "use_sliding_window", True,
                      f"layers {windowed} would use a sliding window (those from max_window_layers="
                      f"{json.dumps(config.get('max_window_layers', 28))} on); set it to false, or max_window_layers "
                      "to the layer count: only full causal attention is implemented")
    rope_scaling = config.get("rope_scaling")
    # {"rope_type": "default"} is how some exports spell "no scaling"; older files say "type".
    rope_type = (rope_scaling.get("rope_type") or rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
    if rope_scaling is not None and rope_type != "default":
        raise _refuse(file, "rope_scaling", rope_scaling, "set it to null; only unscaled RoPE is implemented")
    # transformers applies it wherever it is given (rope_parameters too): RoPE on that fraction of a head only.
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(file, "partial_rotary_factor", config["partial_rotary_factor"],
                      "RoPE rotates every dimension of a head here; set it to 1.0 or remove it")
    if config.get("rope_parameters") is not None:
        # transformers >= 5 writes the RoPE settings here (theta included) instead of rope_theta / rope_scaling.
        rope_parameters = _unscaled_rope(file, config["rope_parameters"])
        if "rope_theta" in rope_parameters:
            theta = rope_parameters["rope_theta"]
            if "rope_theta" in config and config["rope_theta"] != theta:
                raise UserError(f"{file}: rope_theta={json.dumps(config['rope_theta'])} and rope_parameters.rope_theta="
                                f"{json.dumps(theta)} disagree (transformers 5 reads the second, older versions the "
                                "first); keep the one that is right")
            config = dict(config, rope_theta=theta)
    if config.get("attention_bias", True) is not True:
        raise _refuse(file, "attention_bias", config["attention_bias"], "Qwen2 has bias on q/k/v projections")
    if config.get("mlp_bias", False) is not False:
        raise _refuse(file, "mlp_bias", config["mlp_bias"], "Qwen2's MLP has no bias")
    if config.get("attention_dropout", 0.0) != 0.0:
        raise _refuse(file, "attention_dropout", config["attention_dropout"], "set it to 0.0; there is no dropout")
    # "quantization" is MLX's spelling: its files hold packed integer weights, scales and biases.
    for key in ("quantization_config", "quantization"):
        if config.get(key) is not None:
            raise _refuse(file, key, config[key], "load an unquantized checkpoint")

    values = {}
    for key in _SIZE_KEYS:
        if key not in config:
            raise UserError(f"{file}: missing key {key!r}; a Qwen2 config.json states every size")
        values[key] = config[key]
    # transformers' backward compatibility: a null num_key_value_heads means multi-head attention.
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    for key, default in _HF_DEFAULTS.items():
        values[key] = config.get(key, default)
    for key, value in values.items():
        if key == "tie_word_embeddings":
            ok = isinstance(value, bool)
        else:
            # bool is an int in Python, but true is never a size.
            ok = isinstance(value, (int, float) if key in _FLOAT_KEYS else int) and not isinstance(value, bool)
        if not ok:
            raise UserError(f"{file}: {key}={json.dumps(value)} has the wrong type; write it as in transformers")
    for key in _FLOAT_KEYS:
        values[key] = float(values[key])

    args = ModelArgs(**values)
    args.check(file)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != args.head_dim:
        raise _refuse(
            file, "head_dim", head_dim,
            f"head_dim must equal hidden_size / num_attention_heads = {args.head_dim}",
        )
    return args


def _windowed_layers(file: str, config: dict) -> str:
    """The layers transformers gives a sliding window when use_sliding_window is true and layer_types is absent
    (from max_window_layers on, its default 28, unless sliding_window is null), as "i..j"; "" for none."""
    window, first, layers = (config.get(key, default) for key, default in (
        ("sliding_window", 4096), ("max_window_layers", 28), ("num_hidden_layers", 0)))
    for key, value in (("max_window_layers", first), ("num_hidden_layers", layers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{file}: {key}={json.dumps(value)} has the wrong type; write it as in transformers")
    if window is None or first >= layers:
        return ""
    return f"{max(first, 0)}..{layers - 1}"


_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _unscaled_rope(file: str, rope: object) -> dict:
    """config.json's rope_parameters as one flat dict of plain RoPE settings (_ROPE_KEYS); the per-layer-type form
    unwrapped when every layer type has the same. UserError naming the key for anything else: transformers would
    compute another RoPE from it (a scaled rope_type, also under the older key "type", or its parameters)."""
    key = "rope_parameters"
    if isinstance(rope, dict) and rope and all(isinstance(value, dict) for value in rope.values()):
        # {"full_attention": {...}, "sliding_attention": {...}}: transformers 5's form for models that mix layer types.
        settings = list(rope.values())
        if any(other != settings[0] for other in settings[1:]):
            raise _refuse(file, key, rope, "its layer types' RoPE settings differ; the model has one RoPE for all "
                          "layers")
        key, rope = f"{key}.{next(iter(rope))}", settings[0]
    if not isinstance(rope, dict):
        raise _refuse(file, key, rope, 'write it as {"rope_type": "default", "rope_theta": THETA}')
    for name in ("rope_type", "type"):
        if rope.get(name, "default") != "default":
            raise _refuse(file, f"{key}.{name}", rope[name], 'only unscaled RoPE is implemented (rope_type "default")')
    unknown = [name for name in rope if name not in _ROPE_KEYS]
    if unknown:
        raise _refuse(file, f"{key}.{unknown[0]}", rope[unknown[0]],
                      f"only unscaled RoPE is implemented, with the settings {', '.join(_ROPE_KEYS)}; remove it")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(file, f"{key}.partial_rotary_factor", rope["partial_rotary_factor"],
                      "RoPE rotates every dimension of a head here; set it to 1.0 or remove it")
    return rope


def hf_source_fields(path: str) -> dict:
    """What of a Hugging Face checkpoint directory its export should carry (recorded as a checkpoint's
    "hf_source"): config.json's SOURCE_KEYS, generation_config.json when there is one, and the directory's path
    (where its tokenizer files are)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    fields = {key: config[key] for key in SOURCE_KEYS if key in config}
    fields["path"] = os.path.realpath(path)
    generation = os.path.join(path, GENERATION_CONFIG_NAME)
    if os.path.isfile(generation):
        try:
            with open(generation) as f:
                fields["generation_config"] = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise UserError(f"{generation}: not valid JSON ({e}); fix or remove it")
    return fields


def has_tokenizer(path: str) -> bool:
    """Whether a directory holds Hugging Face tokenizer files."""
    return os.path.isfile(os.path.join(path, "tokenizer.json")) or (
        os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")))


def load_export_tokenizer(spec: str, vocab_size: int) -> "str | PreTrainedTokenizerBase":
    """The tokenizer write_tokenizer writes for spec, loaded and checked now, so that one that cannot be written fails
    before any weight is read: "qwen2" for the embedded Qwen2 vocabulary (qwen2-prepare's default), or the
    transformers tokenizer of a Hugging Face tokenizer directory (or hub id in the local cache). UserError when it
    cannot be loaded, or has ids the model's vocabulary (vocab_size rows) cannot hold."""
    from qwen2_dist.data.tokenizer import QWEN2_VOCAB_SIZE

    if spec == "qwen2":
        if vocab_size < QWEN2_VOCAB_SIZE:
            raise UserError(f"--tokenizer qwen2: its {QWEN2_VOCAB_SIZE} tokens do not fit the model's vocab_size "
                            f"{vocab_size}; pass the tokenizer the data was prepared with (--tokenizer DIR)")
        return spec
    fix = "pass --tokenizer qwen2, a Hugging Face tokenizer directory, or --tokenizer none"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(spec))
    except Exception as exc:  # transformers raises OSError, ValueError, hub errors: all mean "cannot load"
        raise UserError(f"--tokenizer {spec}: could not load a Hugging Face tokenizer "
                        f"({' '.join(str(exc).split())}); {fix}") from None
    if len(tokenizer) > vocab_size:
        raise UserError(f"--tokenizer {spec}: {len(tokenizer)} tokens, more than the model's vocab_size "
                        f"{vocab_size}; {fix}")
    return tokenizer


def write_tokenizer(tokenizer: "str | PreTrainedTokenizerBase", out_dir: str,
                    vocab_size: int) -> dict[str, int | None]:
    """Tokenizer files in out_dir: tokenizer is load_export_tokenizer's, or a spec it loads. Returns its bos_token_id
    and eos_token_id as config.json gives them: eos the id that ended the documents the data was prepared from
    (data.tokenizer.document_separator), which is what a trained model predicts at a document's end."""
    from qwen2_dist.data.tokenizer import document_separator, save_qwen2_hf_tokenizer

    loaded = load_export_tokenizer(tokenizer, vocab_size) if isinstance(tokenizer, str) else tokenizer
    if isinstance(loaded, str):  # "qwen2"
        save_qwen2_hf_tokenizer(out_dir)
        return {"bos_token_id": QWEN2_EOS_TOKEN_ID, "eos_token_id": QWEN2_EOS_TOKEN_ID}  # as Qwen2's own config
    loaded.save_pretrained(out_dir)
    return {"bos_token_id": loaded.bos_token_id, "eos_token_id": document_separator(loaded)}


def hf_config_from_args(args: ModelArgs, torch_dtype: str = "float32", source: dict | None = None,
                        token_ids: dict | None = None) -> dict:
    """A config.json dict that transformers' Qwen2ForCausalLM.from_pretrained loads as this architecture; with
    token_ids (write_tokenizer's: of the tokenizer written beside it), its bos and eos ids instead of Qwen2's; with
    source (hf_source_fields of the weights the run started from), their max_position_embeddings and token ids
    over both. A token id outside the vocabulary is left out."""
    config = _hf_config(args, torch_dtype)
    config.update(token_ids or {})
    config.update({key: value for key, value in (source or {}).items() if key in SOURCE_KEYS})
    for key in ("bos_token_id", "eos_token_id"):
        ids = config[key] if isinstance(config[key], list) else [config[key]]
        if any(isinstance(i, int) and i >= args.vocab_size for i in ids):
            config[key] = None
    return config


def _hf_config(args: ModelArgs, torch_dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "initializer_range": args.initializer_range,
        "rms_norm_eps": args.rms_norm_eps,
        # Both spellings: transformers < 5 reads rope_theta / rope_scaling, transformers 5 rope_parameters.
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.num_hidden_layers,
        "attention_dropout": 0.0,
        "bos_token_id": QWEN2_EOS_TOKEN_ID,
        "eos_token_id": QWEN2_EOS_TOKEN_ID,
        "use_cache": True,
        # Both spellings: transformers before 4.56 (and tools reading config.json, vLLM's --dtype auto) read
        # "torch_dtype"; later versions read "dtype" first, and load either without a deprecation warning.
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def hf_to_native_name(name: str) -> str:
    """Native parameter name of a transformers Qwen2ForCausalLM tensor name."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        raise UserError(
            f"tensor {name!r} is not part of a Qwen2ForCausalLM checkpoint (expected model.* or lm_head.weight)"
        )
    return name.removeprefix("model.")


def native_to_hf_name(name: str) -> str:
    """transformers Qwen2ForCausalLM tensor name of a native parameter name."""
    return name if name == "lm_head.weight" else f"model.{name}"


def native_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Every native tensor name and its shape, in the model's parameter order."""
    return {name: t.shape for name, t in build_model(args, "meta").state_dict().items()}


def _skipped_hf_name(name: str, args: ModelArgs) -> bool:
    """Tensors a HF file may hold that the native model does not: the tied head, and a derived rotary buffer."""
    # Old transformers versions saved rotary_emb.inv_freq; it is recomputed from rope_theta.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings)


def _first(names: list[str] | set[str], count: int = 5) -> str:
    """The first few names, sorted, for an error message."""
    names = sorted(names)
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _check_names(native: set[str], wanted: set[str], args: ModelArgs, where: str) -> None:
    """Raise UserError when wanted tensors are absent or the source holds tensors the architecture lacks."""
    missing = wanted - native
    if missing:
        hint = (
            "; config.json has tie_word_embeddings=false, so an untied lm_head.weight is required"
            if "lm_head.weight" in missing else "; does config.json describe this checkpoint?"
        )
        raise UserError(f"{where}: missing {len(missing)} tensors: {_first(missing)}{hint}")
    unexpected = native - set(native_shapes(args))
    if unexpected:
        raise UserError(
            f"{where}: {len(unexpected)} tensors do not belong to the architecture in config.json "
            f"({args.num_hidden_layers} layers): {_first(unexpected)}"
        )


def hf_to_native_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Native state dict from a transformers Qwen2ForCausalLM one (drops a tied lm_head)."""
    native = {hf_to_native_name(k): v for k, v in state_dict.items() if not _skipped_hf_name(k, args)}
    _check_names(set(native), set(native_shapes(args)), args, "HF state dict")
    return native


def native_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers Qwen2ForCausalLM state dict from a native one (no lm_head when tied, as save_pretrained writes)."""
    # A tied model has no lm_head; if a caller passes one anyway, it is the embedding by definition.
    native = {k: v for k, v in state_dict.items() if not (k == "lm_head.weight" and args.tie_word_embeddings)}
    _check_names(set(native), set(native_shapes(args)), args, "native state dict")
    return {native_to_hf_name(k): v for k, v in native.items()}


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file for a checkpoint directory."""
    single = os.path.join(path, WEIGHTS_NAME)
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index with a 'weight_map' ({e}); re-export the checkpoint")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if _pickle_files(path):
        raise UserError(
            f"{path}: holds only pickle weights (pytorch_model*.bin); only safetensors are read. Convert with "
            "qwen2-convert from-hf --allow-pickle, or with "
            "transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise UserError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}; point at a Hugging Face checkpoint directory")


def _check_no_shadowing_files(path: str, hf_files: dict[str, str]) -> None:
    """UserError when a .safetensors file of the directory that the checkpoint's model.safetensors or index does not
    name holds tensors of the same names (a stray copy, another export): what reads the directory as a whole
    (model.init_from_hf, through DCP's HuggingFaceStorageReader) would take some tensors from it, silently. Files of
    other tensors (an adapter) are left alone."""
    named = {os.path.abspath(f) for f in hf_files.values()}
    for file in _safetensors_files(path):
        if os.path.abspath(file) in named:
            continue
        try:
            handle = _open_safetensors(file)
        except UserError as exc:  # the reader would fail on it too, on every rank, after the launch
            raise UserError(f"{path}: {os.path.basename(file)} is not part of the checkpoint and cannot be read "
                            f"({exc}); a loader reading the directory reads every .safetensors file of it. Move "
                            "it out of the directory") from None
        with handle as f:
            shared = sorted(set(f.keys()) & set(hf_files))
        if shared:
            which = WEIGHTS_NAME if hf_files[shared[0]].endswith(WEIGHTS_NAME) else f"the files {INDEX_NAME} names"
            raise UserError(f"{path}: {os.path.basename(file)} is not part of the checkpoint (which is {which}) but "
                            f"holds {len(shared)} of its tensors (e.g. {shared[0]}); a loader reading the directory "
                            "would mix the two. Move it out of the directory")


def _safetensors_files(path: str) -> list[str]:
    """The directory's .safetensors files, sorted, as DCP's HuggingFaceStorageReader finds them: every name with that
    ending, hidden ones too (glob skips a leading dot: a stray `.old.safetensors`, or macOS's `._model.safetensors`,
    went unchecked and was read), and the path taken literally (as a glob pattern, a directory such as run[1]
    matched nothing)."""
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors"))


def _pickle_files(path: str) -> list[str]:
    """The directory's pytorch_model*.bin files, sorted, the path taken literally."""
    return sorted(glob.glob(os.path.join(glob.escape(path), "pytorch_model*.bin")))


def _open_safetensors(file: str) -> safe_open:
    """safe_open a file, refusing missing, corrupt or non-PyTorch-layout files with UserError."""
    if not os.path.isfile(file):
        raise UserError(f"{file}: listed in {INDEX_NAME} but missing; copy the complete checkpoint")
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e}); re-download or re-export it")
    # TF/Flax-format safetensors store transposed kernels under other names.
    fmt = (handle.metadata() or {}).get("format", "pt")
    if fmt not in ("pt", "mlx"):
        raise UserError(f"{file}: safetensors format {fmt!r}; only PyTorch-format files load, re-save with PyTorch")
    return handle


def _read_config(path: str) -> dict:
    """A Hugging Face checkpoint directory's config.json (UserError naming the file when missing or not JSON)."""
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise UserError(f"{config_file}: missing; a Hugging Face checkpoint directory needs its config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{config_file}: not valid JSON ({e})") from None


def inspect_hf(path: str) -> tuple[ModelArgs, dict[str, str]]:
    """ModelArgs of a HF checkpoint dir and the file of each native tensor name, checked; reads no tensor data."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint directory does not exist")
    config_file = os.path.join(path, CONFIG_NAME)
    args = args_from_hf_config(_read_config(path), config_file)
    hf_files = _weight_files(path)
    _check_no_shadowing_files(path, hf_files)
    try:
        files = {hf_to_native_name(k): v for k, v in hf_files.items() if not _skipped_hf_name(k, args)}
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    _check_names(set(files), set(native_shapes(args)), args, path)
    return args, files


def _check_headers(files: dict[str, str], args: ModelArgs) -> None:
    """UserError for a file the index names that is missing or unreadable, a tensor missing from the file the index
    puts it in, or a tensor whose shape is not the one config.json implies: read from the files' headers, so that
    the launchers' check refuses them (DCP's reader would fail on every rank, after the build)."""
    shapes = native_shapes(args)
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with _open_safetensors(file) as f:
            keys = set(f.keys())
            for name in names:
                hf_name = native_to_hf_name(name)
                _check_in_file(file, hf_name, keys)
                _check_shape(file, hf_name, tuple(f.get_slice(hf_name).get_shape()), shapes[name])


def _check_in_file(file: str, hf_name: str, keys: set[str]) -> None:
    if hf_name not in keys:
        raise UserError(f"{file}: has no tensor {hf_name}, which {INDEX_NAME} puts there; re-export or re-download "
                        "the checkpoint")


def _check_shape(file: str, hf_name: str, shape: tuple, wanted: torch.Size) -> None:
    if shape != tuple(wanted):
        raise UserError(f"{file}: {hf_name} has shape {shape} but config.json implies {tuple(wanted)}; the config "
                        "does not match the weights")


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class _MappedSafetensors:
    """The tensors of a safetensors file as views of the file mapped into memory (copy-on-write, never written
    back): nothing is read until used, and what is read stays page cache the kernel can drop, not process memory."""

    def __init__(self, file: str):
        self.file = file
        with open(file, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header_len = int.from_bytes(self.map[:8], "little")
        self.header = json.loads(self.map[8:8 + header_len])
        self.data_start = 8 + header_len

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserError(f"{self.file}: {name} has dtype {entry['dtype']}; only floating-point weights load "
                            "(BF16, F16, F32, F64): a quantized checkpoint is not read, load an unquantized one")
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.data_start + begin).view(
            entry["shape"])


def read_hf_state_dict(path: str, names: set[str] | None = None,
                       mapped: bool = False) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and native-named tensors of a HF checkpoint dir; with names, only those tensors and files are read.
    mapped: the tensors are views of the files mapped into memory (_MappedSafetensors), in their own dtype, rather
    than copies in process memory (qwen2-convert from-hf of a model larger than memory)."""
    args, files = inspect_hf(path)
    shapes = native_shapes(args)
    if names is None:
        names = set(shapes)
    assert names <= set(shapes), f"not tensors of this architecture: {_first(names - set(shapes))}"

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in sorted(by_file.items()):
        with _open_safetensors(file) as f:
            keys = set(f.keys())
            source = _MappedSafetensors(file) if mapped else f
            for name in file_names:
                _check_in_file(file, native_to_hf_name(name), keys)
                tensor = source.get_tensor(native_to_hf_name(name))
                _check_shape(file, native_to_hf_name(name), tuple(tensor.shape), shapes[name])
                tensors[name] = tensor
    # Parameter order, so callers iterate as model.state_dict() does.
    return args, {name: tensors[name] for name in shapes if name in tensors}


def read_pickle_state_dict(path: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Native tensors of a directory holding only pytorch_model*.bin files, unpickled with weights_only=True."""
    args = args_from_hf_config(_read_config(path), os.path.join(path, CONFIG_NAME))
    hf: dict[str, torch.Tensor] = {}
    for file in _pickle_files(path):
        # weights_only refuses anything but tensors and plain containers: no code runs while unpickling.
        try:
            try:
                hf.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except RuntimeError as exc:
                if "_use_new_zipfile_serialization" not in str(exc):
                    raise
                # torch's format before 1.6 cannot be mapped: read into memory instead
                hf.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as exc:  # a damaged file, or objects weights_only refuses
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UserError(f"{file}: cannot be read as PyTorch weights ({type(exc).__name__}: {first}); save the "
                            "model again with transformers' save_pretrained (safetensors), or copy the file "
                            "again") from None
    state_dict = hf_to_native_state_dict(hf, args)
    shapes = native_shapes(args)
    for name, tensor in state_dict.items():
        if name in shapes:
            _check_shape(f"{path}/pytorch_model*.bin", native_to_hf_name(name), tuple(tensor.shape), shapes[name])
    return args, state_dict


def read_weights(path: str, allow_pickle: bool = False, mapped: bool = False) -> tuple[ModelArgs, dict]:
    """ModelArgs and native-named tensors of a HF Qwen2 directory: its safetensors (read_hf_state_dict, mapped as
    there), or with allow_pickle, when it holds only pytorch_model*.bin files, those (read_pickle_state_dict)."""
    if allow_pickle and not _safetensors_files(path) and _pickle_files(path):
        return read_pickle_state_dict(path)  # unpickled with mmap=True: views of the files too
    return read_hf_state_dict(path, mapped=mapped)


def load_hf_model(path: str, device: str = "cpu", allow_pickle: bool = False) -> Qwen2:
    """The native model with the exact weights of a HF Qwen2 checkpoint directory.

    Only safetensors are read unless allow_pickle is set; then a directory with only pytorch_model*.bin files is
    read too, with torch.load(weights_only=True).
    """
    args, state_dict = read_weights(path, allow_pickle)
    # Meta then to_empty: skip a random initialization that the checkpoint overwrites at once.
    model = build_model(args, "meta").to_empty(device=device)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_hf_matches(path: str, args: ModelArgs) -> None:
    """UserError naming model.init_from_hf and every field of its config.json that differs from args (the fields
    that change no weight and no computation of a training step are not compared), or a weight file or tensor that
    is missing or of the wrong shape; reads the files' headers, no tensor data."""
    hf_args, files = inspect_hf(path)
    theirs = hf_args.to_dict()
    differ = [key for key, value in theirs.items() if key not in INERT_ARGS and getattr(args, key) != value]
    if differ:
        from qwen2_dist.model.args import SIZES

        same = [name for name, size in SIZES.items()
                if all(getattr(size, k) == v for k, v in theirs.items() if k not in INERT_ARGS)]
        # As checkpoint.check_model_args words it for a checkpoint of another size.
        overrides = " ".join(f"model.{key}={theirs[key]}" for key in differ)
        fix = f"set model={same[0]}" if same else f"set the model.* overrides that match it: {overrides}"
        diffs = ", ".join(f"{key} {theirs[key]} vs {getattr(args, key)}" for key in differ)
        raise UserError(f"model.init_from_hf={path}: config.json differs from the model being trained "
                        f"(config.json vs job: {diffs}); {fix}")
    try:
        _check_headers(files, hf_args)
        hf_source_fields(path)  # what the run's checkpoints will record of it: a bad generation_config.json
    except UserError as exc:
        raise UserError(f"model.init_from_hf={path}: {exc}") from None


def load_hf_into(model: torch.nn.Module, path: str) -> None:
    """Load HF weights into a (possibly FSDP/TP-sharded) native model in place; each rank reads only its pieces."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from qwen2_dist.train.checkpoint import describe_error

    check_hf_matches(path, model.args)
    # The state dict's tensors are the model's own (local shards of DTensors): DCP reads into them in place,
    # and its planner asks each rank's storage reader only for the slices that rank holds.
    state = {native_to_hf_name(k): v for k, v in get_model_state_dict(model).items()}
    try:
        dcp_load(state, storage_reader=HuggingFaceStorageReader(path))
    except (Exception, CheckpointException) as exc:  # DCP's wrapper is a BaseException
        raise UserError(f"model.init_from_hf={path}: the weights cannot be loaded ({describe_error(exc)}); check "
                        "that the directory holds the complete checkpoint of this model") from None


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in order, as transformers does: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _prepare(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage, as safetensors requires."""
    out = {}
    seen = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        # save_file refuses tensors that share memory (one tensor under two names, views into one buffer).
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def write_hf(
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """Write a native state dict as a HF Qwen2ForCausalLM checkpoint (config.json + safetensors) into out_dir."""
    native_to_hf_state_dict(state_dict, args)  # checks the names
    for name, shape in native_shapes(args).items():
        if name in state_dict and state_dict[name].shape != shape:
            raise UserError(
                f"native state dict: {name} has shape {tuple(state_dict[name].shape)} but the model arguments "
                f"imply {tuple(shape)}; the state dict belongs to another architecture"
            )
    write_hf_from(lambda names: {n: state_dict[n] for n in names}, args, out_dir, max_shard_bytes,
                  dtype or state_dict["embed_tokens.weight"].dtype, overwrite)


def write_hf_from(
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    args: ModelArgs,
    out_dir: str,
    max_shard_bytes: int,
    dtype: torch.dtype,
    overwrite: bool = False,
    source: dict | None = None,
    tokenizer: "str | PreTrainedTokenizerBase | None" = None,
) -> None:
    """Write a HF checkpoint whose tensors come from fetch(native names), called once per output file.

    Only one output file's tensors are in memory at a time, so a model larger than memory exports too. source:
    see hf_config_from_args; its generation_config is written as generation_config.json. tokenizer: tokenizer
    files written beside the weights (write_tokenizer), or none. Without overwrite, an output that another process
    wrote at out_dir meanwhile is left alone (fsutil.OutputTaken: this one is kept beside it).
    """
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes={max_shard_bytes}: the largest safetensors file must be a positive size")
    if overwrite and os.path.isdir(out_dir):
        out_dir = os.path.realpath(out_dir)
    else:
        out_dir = new_output_dir(out_dir, "choose another output path or pass overwrite=True")

    shapes = {n: s for n, s in native_shapes(args).items() if not _skipped_hf_name(native_to_hf_name(n), args)}
    sizes = {native_to_hf_name(n): shape.numel() * dtype.itemsize for n, shape in shapes.items()}
    shards = _shard_plan(sizes, max_shard_bytes)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # Written next to out_dir and renamed into place, so a failed export leaves no half-written checkpoint.
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    leftovers = sorted(glob.glob(glob.escape(os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-")) + "*"))
    if leftovers:  # a killed export (SIGKILL, a time limit) leaves its hidden copy, as large as the model
        log.warning("%d unfinished export(s) of an earlier, interrupted run beside %s, never used: %s; delete them "
                    "(rm -r) to free their space", len(leftovers), out_dir, ", ".join(leftovers))
    os.mkdir(tmp)
    token_ids = None
    try:
        if tokenizer is not None:  # first: a tokenizer that cannot be written fails before the weights are read
            token_ids = write_tokenizer(tokenizer, tmp, args.vocab_size)
        weight_map = {}
        # disable=None: a progress bar on a terminal, silence in logs and CI.
        for i, shard in enumerate(tqdm(shards, desc=f"writing {os.path.basename(out_dir)}", unit="file", disable=None)):
            file = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            native = fetch([hf_to_native_name(n) for n in shard])
            tensors = _prepare({native_to_hf_name(n): t for n, t in native.items()}, dtype)
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            chmod_as_created(os.path.join(tmp, file))
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(hf_config_from_args(args, str(dtype).removeprefix("torch."), source, token_ids), f, indent=2)
        if (source or {}).get("generation_config") is not None:
            with open(os.path.join(tmp, GENERATION_CONFIG_NAME), "w") as f:
                json.dump(source["generation_config"], f, indent=2)
        for name in os.listdir(tmp):  # on disk before the export is renamed into place, complete
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
        if overwrite:
            replace_dir(tmp, out_dir)
        else:
            publish_dir(tmp, out_dir)
    except OutputTaken:
        raise  # the finished output stays where the message says, not deleted with a failed one's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
