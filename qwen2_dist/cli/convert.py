"""qwen2-convert: Hugging Face Qwen2 weights <-> qwen2-dist checkpoints, offline, on the CPU.

  qwen2-convert from-hf HF_DIR OUT_DIR    a committed, model-only checkpoint (start a run from it with
                                          checkpoint.resume=OUT_DIR: weights loaded, step 0, fresh optimizer;
                                          restarts resume from the run's own checkpoints)
  qwen2-convert to-hf CKPT_DIR HF_DIR     a directory transformers' Qwen2ForCausalLM.from_pretrained loads, with
                                          the tokenizer's files (--tokenizer)
  qwen2-convert verify PATH [PATH ...]    check committed checkpoints' files (sizes and checksums) without
                                          loading them, e.g. after copying one to another cluster; PATH is a
                                          checkpoint or a run directory (all of its checkpoints); exit 2 if any
                                          is damaged
"""

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

import torch

from qwen2_dist.cli import exit_without_collecting
from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import new_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("qwen2_dist")


def _name_of(args) -> str | None:
    """The named size with exactly these arguments, if any."""
    from qwen2_dist.model.args import SIZES

    return next((name for name, known in SIZES.items() if known == args), None)


def from_hf(hf_dir: str, out_dir: str, allow_pickle: bool = False) -> str:
    """Convert a Hugging Face Qwen2 directory into a committed model-only checkpoint at out_dir.

    The weights are written as the files hold them (bf16 for the published models; a load converts them to the
    fp32 parameters exactly), from views of the files mapped into memory: no copy of the model in process memory,
    so a model larger than memory converts too."""
    from qwen2_dist.model.hf import hf_source_fields, read_weights
    from qwen2_dist.train import checkpoint

    out_dir = new_output_dir(out_dir, "choose a new output directory")
    args, state = read_weights(hf_dir, allow_pickle, mapped=True)
    name = _name_of(args)
    meta = {"model": name, "model_args": args.to_dict(), "world_size": 1, "source": os.path.abspath(hf_dir),
            "step": 0, "tokens_seen": 0, "hf_source": hf_source_fields(hf_dir),
            "init_from": {"init_from_hf": os.path.realpath(hf_dir), "init_from_checkpoint": None}}
    checkpoint.write(out_dir, state, None, {"step": 0, "tokens_seen": 0}, meta)
    return out_dir


def to_hf(ckpt_dir: str, hf_dir: str, max_shard_gib: float = 5.0, dtype: str = "bfloat16",
          checksums: bool = True, tokenizer: str = "auto") -> str:
    """Export the model weights of a committed checkpoint as a Hugging Face Qwen2 directory, with the tokenizer's
    files (export_tokenizer).

    Reads the checkpoint one output file at a time (DCP loads just the tensors asked for), so memory stays at
    one safetensors shard, not the whole model.
    """
    from qwen2_dist.model.args import ModelArgs
    from qwen2_dist.model.hf import native_shapes, write_hf_from
    from qwen2_dist.train import checkpoint

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"--dtype {dtype}: choose bfloat16, float32 or float16")
    # Before the checkpoint's files are read (with checksums, all of them, optimizer state included).
    if not 0 < max_shard_gib < float("inf") or int(max_shard_gib * 2**30) < 1:
        raise UserError(f"--max-shard-gib {max_shard_gib}: the largest safetensors file must be a positive, finite "
                        "size of at least a byte, e.g. 5")
    hf_dir = new_output_dir(hf_dir, "choose another output path")
    # The tokenizer is loaded from the metadata alone, before verify reads every file (a 72B run's: about a TB), so
    # that a --tokenizer that cannot be written fails in seconds.
    meta = checkpoint.read_metadata(ckpt_dir)
    loaded_tokenizer = export_tokenizer(tokenizer, meta, ModelArgs(**meta["model_args"]).vocab_size)
    meta = checkpoint.verify(ckpt_dir, checksums)
    args = ModelArgs(**meta["model_args"])
    shapes = native_shapes(args)

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        return checkpoint.read_tensors(ckpt_dir, {name: shapes[name] for name in names})

    write_hf_from(fetch, args, hf_dir, int(max_shard_gib * 2**30), dtypes[dtype], source=_export_source(meta, args),
                  tokenizer=loaded_tokenizer)
    return hf_dir


# Text of the kinds the data holds (prose, CJK, code with its whitespace, digits, accents that NFC composes): a
# tokenizer that encodes these as the embedded Qwen2 vocabulary does and has its special tokens at the same ids is
# the same byte-level BPE (Qwen2's, Qwen2.5's, which adds special tokens and a chat template).
_PROBES = ("Hello, world! The quick brown fox jumps over 13 lazy dogs.", "你好，世界。日本語のテキストと한국어",
           "def f(x):\n    return x ** 2  # 12345\n\n\tpass\r\n", "cafe\u0301 e\u0301te\u0301 naïve")


def _qwen2_mismatch(tokenizer: "PreTrainedTokenizerBase") -> str | None:
    """How a transformers tokenizer encodes otherwise than the embedded Qwen2 vocabulary (tokenizer=qwen2): the
    first probe text or Qwen2 special token whose ids differ; None when none does."""
    from qwen2_dist.data.tokenizer import QWEN2_SPECIAL_TOKENS, load_tokenizer

    qwen2 = load_tokenizer("qwen2")
    for text in _PROBES:
        # As qwen2-prepare encodes with a Hugging Face tokenizer (data.tokenizer): special-token text stays text.
        theirs = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ours = qwen2.encode(text)
        if theirs != ours:
            return f"it encodes {text!r} as {theirs}, qwen2 as {ours}"
    for token, token_id in QWEN2_SPECIAL_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            return f"its {token} is id {tokenizer.convert_tokens_to_ids(token)}, qwen2's {token_id}"
    return None


def export_tokenizer(choice: str, meta: dict, vocab_size: int) -> "str | PreTrainedTokenizerBase | None":
    """The tokenizer to_hf writes beside the weights, loaded (model.hf.load_export_tokenizer; None: none):
    --tokenizer qwen2, DIR or none as given; auto: the one the checkpoint's training data was prepared with
    (recorded since 2026-12-05), except that data prepared with qwen2 gets the tokenizer files of the Hugging Face
    weights the run started from when those encode as qwen2 does (a Qwen2.5 or Instruct tokenizer: the same ids,
    and its chat template and special tokens); without a recorded one, the source's; else none, with a warning that
    says how to choose one (evaluation tools and vLLM load the tokenizer from the model directory)."""
    from qwen2_dist.model.hf import has_tokenizer, load_export_tokenizer

    if choice != "auto":
        return None if choice == "none" else load_export_tokenizer(choice, vocab_size)
    data = meta.get("data_tokenizer")
    source = (meta.get("hf_source") or {}).get("path") if isinstance(meta.get("hf_source"), dict) else None
    if not (isinstance(source, str) and os.path.isdir(source) and has_tokenizer(source)):
        source = None
    if data == "qwen2" and source is not None:
        try:
            candidate = load_export_tokenizer(source, vocab_size)
            mismatch = _qwen2_mismatch(candidate)
        except UserError as exc:
            candidate, mismatch = None, str(exc)
        if mismatch is None:
            log.info("tokenizer: the one of %s, the Hugging Face weights the run started from, with its chat template "
                     "and special tokens: it encodes text as qwen2 (which the training data was prepared with) does "
                     "(--tokenizer to choose another)", source)
            return candidate
        log.warning("tokenizer: qwen2, which the training data was prepared with, not the one of %s, the Hugging "
                    "Face weights the run started from (%s): the export has neither that one's chat template nor its "
                    "extra special tokens (--tokenizer %s writes it even so)", source, mismatch, source)
        return load_export_tokenizer(data, vocab_size)
    if isinstance(data, str) and (data == "qwen2" or os.path.isdir(data) or not data.startswith((".", "/", "~"))):
        log.info("tokenizer: %s, which the training data was prepared with (--tokenizer to choose another)", data)
        return load_export_tokenizer(data, vocab_size)
    if isinstance(data, str):
        log.warning("tokenizer: the training data was prepared with %s, which is not a directory here", data)
    if source is not None:
        log.info("tokenizer: the one of %s, the Hugging Face weights the run started from (--tokenizer to choose "
                 "another)", source)
        return load_export_tokenizer(source, vocab_size)
    log.warning("no tokenizer written: the checkpoint names no one tokenizer its data was prepared with that is "
                "found here (saved before 2026-12-05, trained on data.synthetic, sources prepared with different "
                "tokenizers, or a tokenizer directory moved since). Tools such as vLLM and lm-eval load the "
                "tokenizer from the model directory: export again with --tokenizer qwen2 (qwen2-prepare's default, "
                "the embedded Qwen2 vocabulary) or --tokenizer DIR (a Hugging Face tokenizer directory)")
    return None


def _export_source(meta: dict, args) -> dict | None:
    """What the export keeps of the Hugging Face weights the run started from (model.hf.hf_config_from_args): their
    max_position_embeddings only while the run kept its size's own (a model.max_position_embeddings override, a
    longer-context stage, wins). The context written is at least the longest train.seq_len the weights were trained
    at (recorded by checkpoints since 2026-12-05, "trained_seq_len"): a stage at 64k on a 32k source exports 64k."""
    from qwen2_dist.model.args import SIZES

    source = meta.get("hf_source")
    source = dict(source) if isinstance(source, dict) else {}
    size = SIZES.get(meta.get("model") or "")
    if size is not None and args.max_position_embeddings != size.max_position_embeddings:
        source.pop("max_position_embeddings", None)
    trained = meta.get("trained_seq_len")
    if isinstance(trained, int) and trained > source.get("max_position_embeddings", args.max_position_embeddings):
        source["max_position_embeddings"] = trained
    return source or None


def checkpoints_under(path: str) -> list[str]:
    """The committed checkpoints a verify argument names: the checkpoint itself, or every committed step_* directory
    of a checkpoints directory or of a run directory (its checkpoints/), oldest first."""
    from qwen2_dist.train import checkpoint

    if checkpoint.is_committed(path):
        return [path]
    for root in (os.path.join(path, "checkpoints"), path):
        found = checkpoint.committed_checkpoints(root)
        if found:
            leftovers = [name for name in sorted(os.listdir(root)) if name.startswith("step_")
                         and os.path.join(root, name) not in found]
            for name in leftovers:
                print(f"not committed: {os.path.join(root, name)} (an interrupted save; not a checkpoint, and the "
                      "run's next start removes it)")
            return found
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory; name a checkpoint (RUN_DIR/checkpoints/step_N), a checkpoints "
                        "directory or a run directory")
    raise UserError(f"{path}: holds no committed checkpoint (a step_* directory with {checkpoint.METADATA}), "
                    "neither itself nor under checkpoints/")


def verify(paths: list[str]) -> int:
    """Check every file of each named committed checkpoint (or of every checkpoint of a run) against its recorded
    size and checksum, without loading anything; one line per checkpoint. 0 when all are intact, 2 otherwise."""
    from qwen2_dist.train import checkpoint

    damaged = 0
    for path in paths:
        try:
            found = checkpoints_under(path)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            damaged += 1
            continue
        for ckpt_dir in found:
            try:
                meta = checkpoint.verify(ckpt_dir)
            except UserError as exc:
                print(f"damaged: {exc}", file=sys.stderr)
                damaged += 1
                continue
            files, sums = meta.get("files", {}), meta.get("checksums", {})
            what = f"{len(sums)} checksums" if sums else "sizes only: this checkpoint recorded no checksums"
            print(f"ok: {ckpt_dir}: step {meta.get('step')}, {len(files)} files, "
                  f"{sum(files.values()) / 2**30:.2f} GiB ({what})")
    return 2 if damaged else 0


def main(argv: list[str] | None = None) -> int:
    """Console script qwen2-convert."""
    exit_without_collecting()
    parser = argparse.ArgumentParser(prog="qwen2-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_from = sub.add_parser("from-hf", help="Hugging Face directory -> checkpoint")
    p_from.add_argument("hf_dir")
    p_from.add_argument("out_dir")
    p_from.add_argument("--allow-pickle", action="store_true",
                        help="also read pytorch_model*.bin (unpickled with weights_only=True); off: safetensors only")
    p_to = sub.add_parser("to-hf", help="checkpoint -> Hugging Face directory")
    p_to.add_argument("ckpt_dir")
    p_to.add_argument("hf_dir")
    p_to.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors file (GiB)")
    p_to.add_argument("--dtype", default="bfloat16",
                      help="bfloat16 (default: as the published Qwen2 weights, and what vLLM's --dtype auto serves "
                      "them in), float32 (the master weights exactly, twice the files) or float16")
    p_to.add_argument("--tokenizer", default="auto",
                      help="tokenizer files written beside the weights: qwen2 (the embedded Qwen2 vocabulary), a "
                      "Hugging Face tokenizer directory, none, or auto (default: the tokenizer the training data "
                      "was prepared with, or, for data prepared with qwen2, the one of the Hugging Face weights the "
                      "run started from when it encodes alike: its chat template and special tokens)")
    p_to.add_argument("--no-checksums", action="store_true",
                      help="check the checkpoint's file sizes only, not their checksums (which reads every file once "
                           "more, optimizer state included)")
    p_verify = sub.add_parser("verify", help="check checkpoints' files (sizes, checksums) without loading them")
    p_verify.add_argument("paths", nargs="+", metavar="PATH",
                          help="a checkpoint, or a run (or checkpoints) directory: every committed checkpoint in it")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if opts.command == "verify":
            return verify(opts.paths)
        if opts.command == "from-hf":
            out = from_hf(opts.hf_dir, opts.out_dir, opts.allow_pickle)
        else:
            out = to_hf(opts.ckpt_dir, opts.hf_dir, opts.max_shard_gib, opts.dtype, not opts.no_checksums,
                        opts.tokenizer)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
