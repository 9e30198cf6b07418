"""qwen2-prepare: tokenize text, JSONL or Parquet files into MDS shards of fixed-length samples."""

import logging
import os
import signal
import sys
from dataclasses import dataclass, fields
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen2_dist.cli import exit_without_collecting
from qwen2_dist.data.prepare import SUMMARY_NAME, prepare
from qwen2_dist.errors import UserError

USAGE = (
    "usage: qwen2-prepare input=FILES output=DIR [seq_len=2048] [tokenizer=qwen2] [text_field=text] "
    "[text_split=file|line|paragraph|endoftext] [workers=0] [val_fraction=0.005] [overwrite=false] "
    "[max_tokens=null] [progress=true]"
)


@dataclass
class PrepareConfig:
    input: str = "???"
    """Files or glob patterns, comma-separated: .jsonl/.json/.ndjson/.jsonlines are JSON lines, .parquet is Parquet,
    anything else is text (cut into documents by text_split); .gz, .zst or .zstd after the name means compressed
    (e.g. data.jsonl.zst)."""
    output: str = "???"
    """Directory for the MDS shards and prepare_summary.json; must not exist or be empty unless overwrite=true."""
    seq_len: int = 2048
    """Training sequence length; each stored sample holds seq_len + 1 tokens (inputs and shifted targets)."""
    tokenizer: str = "qwen2"
    """qwen2 (the embedded Qwen2 vocabulary) or a Hugging Face tokenizer directory or hub id."""
    text_field: str = "text"
    """Field of each JSON record (or column of each Parquet file) that holds the document text."""
    text_split: str = "file"
    """How a text file is cut into documents: file (the whole file is one), line (each non-empty line), paragraph
    (separated by blank lines) or endoftext (separated by the literal <|endoftext|>, as in TinyStories)."""
    workers: int = 0
    """Tokenizer processes; 0 = one per available CPU core (capped by a container's cgroup CPU quota). The output is
    identical for any value."""
    val_fraction: float = 0.005
    """Fraction of documents held out in the val/ split, chosen by a stable hash of each document's text."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    max_tokens: Optional[int] = None
    """Stop after this many tokens (eos included, both splits); null reads all inputs."""
    progress: bool = True
    """Show a progress bar (input bytes read, tokens/s) on stderr."""


def parse_args(argv: list[str]) -> PrepareConfig:
    """PrepareConfig from key=value arguments; raises UserError naming a bad key or value."""
    cfg = OmegaConf.structured(PrepareConfig)
    names = [f.name for f in fields(PrepareConfig)]
    valid = ", ".join(names)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"argument {arg!r} is not key=value; valid keys: {valid}")
        if key not in names:
            raise UserError(f"unknown key {key!r}; valid keys: {valid}")
        # Assigning the raw string lets OmegaConf convert and check it against the field's type, without the YAML
        # parsing of from_dotlist, which rejects unquoted globs such as input=*.jsonl (YAML reads * as an alias).
        try:
            cfg[key] = None if value == "null" else value
        except OmegaConfBaseException as e:
            raise UserError(f"bad value {arg!r}: {str(e).splitlines()[0]}; valid keys: {valid}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(k + '=' for k in missing)} required; {USAGE}")
    return OmegaConf.to_object(cfg)


_MAIN_PID = os.getpid()


def _exit_on_sigterm(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked tokenizing worker (the pool stops them with SIGTERM): die of it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run qwen2-prepare on argv (default sys.argv[1:]); returns the exit status."""
    exit_without_collecting()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    if not logging.getLogger().handlers:
        # Python alone prints warnings only; the worker count chosen (an info line) is for people too. Other
        # libraries stay at warnings.
        logging.basicConfig(format="%(message)s")
        logging.getLogger("qwen2_dist").setLevel(logging.INFO)
    # SIGTERM (kill, a Slurm time limit) ends the run as an exception does: the partial output is removed.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cfg = parse_args(argv)
        summary = prepare(
            inputs=[p for p in cfg.input.split(",") if p],
            output=cfg.output,
            seq_len=cfg.seq_len,
            tokenizer=cfg.tokenizer,
            text_field=cfg.text_field,
            text_split=cfg.text_split,
            overwrite=cfg.overwrite,
            max_tokens=cfg.max_tokens,
            workers=cfg.workers,
            val_fraction=cfg.val_fraction,
            progress=cfg.progress,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    skipped = ", ".join(f"{reason}={n}" for reason, n in summary["skipped"].items() if n) or "none"
    splits = ", ".join(f"{name} {s['samples']}" for name, s in summary["splits"].items())
    print(
        f"prepared {summary['samples']} samples of {summary['sample_tokens']} tokens ({summary['tokens']} tokens; "
        f"{splits}) from {summary['documents']} documents in {len(summary['inputs'])} files; "
        f"dropped {summary['dropped_tail_tokens']} tail tokens; skipped: {skipped}"
    )
    print(os.path.join(os.path.abspath(os.path.expanduser(cfg.output)), SUMMARY_NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
