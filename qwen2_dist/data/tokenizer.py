"""Text to token ids: the embedded Qwen2 vocabulary (tiktoken) or any Hugging Face tokenizer."""

import binascii
import functools
import importlib.resources
import json
import logging
import os
import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
import tiktoken

from qwen2_dist.errors import UserError

log = logging.getLogger(__name__)

# The Qwen2 pre-tokenizer (see assets/VOCAB_PROVENANCE.md): digits split one by one.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_NUM_REGULAR_TOKENS = 151_643
ENDOFTEXT = "<|endoftext|>"
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
QWEN2_VOCAB_SIZE = QWEN2_NUM_REGULAR_TOKENS + len(QWEN2_SPECIAL_TOKENS)  # the tokenizer's (the model's is padded)


# Code points Hugging Face tokenizers' NFC (the normalizer of Qwen2's tokenizer files, so of Qwen2TokenizerFast;
# the slow Qwen2Tokenizer uses Python's) does not know: its Unicode tables are older than Python's, so it takes the
# combining marks added since for starters, never moving them, and does not compose the pairs added since (each
# begins with a letter here, or with a composite of such a pair). Python's tables change with its version (Unicode
# 14.0 in 3.11, 15.0 in 3.12, ...).
# nfc() keeps these code points where they are and normalizes the text between them: the ids of Qwen2TokenizerFast,
# on every Python version. Found by comparing the NFC of tokenizers 0.22.2 with unicodedata2 18.0's (Unicode 18.0)
# on each combining mark next to a mark of every class tokenizers knows, each canonical decomposition, and each
# composite followed by what composes with it (U+16121 U+1611F: U+16126);
# tests/unit/test_tokenizer.py compares them again with the installed versions and with Python's own tables.
_NFC_KEPT_RANGES = (
    "05C8-05C9 07FD 0897-089F 08CA-08D3 09FE 0C3C 0D3B-0D3C 0EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105D2 105DA "
    "10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50 10F82-10F85 11070 "
    "1133B 11382 11384 1138B 11390 113C2 113CE-113D0 1145E 11839-1183A 11935 1193D-1193E 11943 119E0 11A34 "
    "11A47 11A99 11D42 11D44-11D45 11D97 11F41-11F42 1611E 16121-16122 16129 1612F 16D63 16D67 16FF0-16FF1 "
    "1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F 1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF "
    "1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5"
)
_NFC_KEPT = frozenset(
    chr(cp) for item in _NFC_KEPT_RANGES.split()
    for cp in range(int(item.split("-")[0], 16), int(item.split("-")[-1], 16) + 1)
)
_NFC_KEPT_SPLIT = re.compile(f"([{''.join(sorted(_NFC_KEPT))}])")  # (no code point here is special in a class)


def nfc(text: str) -> str:
    """text in NFC as Hugging Face tokenizers normalizes it: the code points of _NFC_KEPT stay where they are."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text  # (what Python's NFC leaves as it is, tokenizers' leaves too: it knows fewer marks, no more)
    if _NFC_KEPT.isdisjoint(text):  # (a third of the time of the regular expression's search)
        return unicodedata.normalize("NFC", text)
    parts = _NFC_KEPT_SPLIT.split(text)  # text, a kept code point, text, ...
    return "".join(part if i % 2 else unicodedata.normalize("NFC", part) for i, part in enumerate(parts))


@functools.lru_cache(maxsize=1)
def qwen2_encoding() -> tiktoken.Encoding:
    """The tiktoken Encoding of the embedded Qwen2 vocabulary (built once per process)."""
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which copies even local files into a cache
    # directory under /tmp.
    data = importlib.resources.files("qwen2_dist").joinpath("assets/qwen.tiktoken").read_bytes()
    # binascii directly: base64.b64decode's argument checks cost more than the decoding, 151k times over.
    fields = data.split()
    ranks = dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))
    assert len(ranks) == QWEN2_NUM_REGULAR_TOKENS, f"qwen.tiktoken has {len(ranks)} tokens"
    return tiktoken.Encoding(
        name="qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=QWEN2_SPECIAL_TOKENS
    )


class Tokenizer:
    """Plain-text encoder: special-token strings in the text are encoded as ordinary text, never as specials."""

    def __init__(
        self,
        name: str,
        encode_batch: Callable[[list[str]], list[list[int]]],
        decode: Callable[[list[int]], str],
        eos_id: int,
        vocab_size: int,
        encode_flat: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.name = name
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self._encode_batch = encode_batch
        self._encode_flat = encode_flat
        self._decode = decode

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without eos."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without eos."""
        if not texts:  # a Hugging Face tokenizer raises IndexError on an empty batch
            return []
        return self._encode_batch(texts)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all texts concatenated (int32, without eos) and the number of tokens of each text (int64)."""
        if self._encode_flat is not None:
            return self._encode_flat(texts)
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special ids become their strings)."""
        return self._decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _qwen2_tokenizer() -> Tokenizer:
    # The vocabulary is parsed on first use (about a second), so a process that only needs eos_id never pays.
    def encode_flat(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # One text at a time on this thread: the caller decides the parallelism (qwen2-prepare's workers=), and
        # encode_to_numpy skips building Python lists. disallowed_special=() encodes special-token text as text.
        enc = qwen2_encoding()
        arrays = [enc.encode_to_numpy(nfc(t), disallowed_special=()) for t in texts]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.int32) if arrays else np.empty(0, np.int32)
        return flat, lengths

    return Tokenizer(
        name="qwen2",
        encode_batch=lambda texts: qwen2_encoding().encode_ordinary_batch(
            [nfc(t) for t in texts]
        ),
        decode=lambda ids: qwen2_encoding().decode(ids),
        eos_id=QWEN2_SPECIAL_TOKENS["<|endoftext|>"],
        vocab_size=QWEN2_VOCAB_SIZE,
        encode_flat=encode_flat,
    )


def document_separator(hf) -> int | None:
    """The id that ends each document of a Hugging Face tokenizer's data: <|endoftext|> where the tokenizer has it
    as a token (Qwen's pretraining data uses it; a Qwen Instruct or Qwen2.5 tokenizer's eos is <|im_end|>, the end
    of a chat turn), else its eos token; None when it has neither."""
    found = hf.convert_tokens_to_ids(ENDOFTEXT)
    return found if found is not None and found != hf.unk_token_id else hf.eos_token_id


def _hf_tokenizer(spec: str) -> Tokenizer:
    fix = "pass tokenizer=qwen2 for the embedded Qwen2 vocabulary, or a local Hugging Face tokenizer directory"
    try:
        import transformers
    except ImportError:
        raise UserError(
            f"tokenizer={spec} needs the transformers package, which is not installed; "
            f"pip install transformers, or {fix}"
        ) from None
    path = os.path.expanduser(spec)
    # A hub id ("org/name") never starts like a path; failing here avoids a slow, confusing network error.
    if spec.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise UserError(f"tokenizer={spec}: no such directory; {fix}")
    try:
        hf = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...; all mean "cannot load".
        reason = " ".join(str(e).split())  # transformers' messages span lines; an error here is one line.
        raise UserError(f"tokenizer={spec}: could not load a Hugging Face tokenizer ({reason}); {fix}") from e
    # The document separator: <|endoftext|> where the tokenizer has it as a special token, as Qwen's pretraining
    # data uses it; a Qwen Instruct or Qwen2.5 tokenizer's eos is <|im_end|>, the end of a chat turn. Else its eos.
    separator = document_separator(hf)
    if separator is not None and separator != hf.eos_token_id:
        log.info("tokenizer %s: documents are separated by %s (id %d), not by its eos token %s", spec, ENDOFTEXT,
                 separator, hf.eos_token)
    if separator is None:
        raise UserError(
            f"tokenizer={spec} defines no eos token, which separates documents; set eos_token in its config"
        )

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # split_special_tokens: "<|endoftext|>" inside a document is text, as in the embedded tokenizer.
        return hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    return Tokenizer(
        # A directory by its real path (recorded in prepare_summary.json and, through it, in checkpoints, where
        # qwen2-convert to-hf finds the tokenizer again from another working directory); a hub id as given.
        name=os.path.realpath(path) if os.path.isdir(path) else spec,
        encode_batch=encode_batch,
        decode=lambda ids: hf.decode(ids, skip_special_tokens=False),
        eos_id=separator,
        vocab_size=len(hf),
    )


def save_qwen2_hf_tokenizer(out_dir: str) -> None:
    """The embedded Qwen2 vocabulary as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt; with transformers 4 also special_tokens_map.json) in out_dir, which transformers'
    AutoTokenizer, vLLM and lm-eval load: the same byte-level BPE, pre-tokenizer and NFC normalization, so it
    encodes text as tokenizer=qwen2 does (special-token strings in text aside, which it reads as the special
    tokens); eos = pad = <|endoftext|>, no bos, as Qwen2's."""
    try:
        from tokenizers import normalizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as exc:
        raise UserError(f"writing the Qwen2 tokenizer needs transformers and tokenizers ({exc}); pip install "
                        "transformers") from None
    with importlib.resources.as_file(importlib.resources.files("qwen2_dist").joinpath("assets/qwen.tiktoken")) as f:
        converted = TikTokenConverter(vocab_file=str(f), pattern=QWEN2_PATTERN,
                                      additional_special_tokens=QWEN2_SPECIAL_TOKENS).converted()
    converted.normalizer = normalizers.NFC()
    specials = [token for token in QWEN2_SPECIAL_TOKENS if token != ENDOFTEXT]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                        additional_special_tokens=specials)
    tokenizer.save_pretrained(out_dir)
    # vocab.json and merges.txt too, as Qwen2's own repositories have them: the slow Qwen2Tokenizer
    # (use_fast=False) and tools that read the BPE files themselves need them.
    converted.model.save(out_dir)
    # The settings written as Qwen2's own tokenizer_config.json has them, not as this transformers version would:
    # transformers 5 names its generic class (TokenizersBackend), which transformers 4 cannot load, and 4's generic
    # class would hand generate() token_type_ids. Qwen2Tokenizer loads in both (the fast one, from tokenizer.json).
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
        "unk_token": None, "additional_special_tokens": specials, "model_max_length": 32768, "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for token, i in QWEN2_SPECIAL_TOKENS.items()},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(spec: str = "qwen2") -> Tokenizer:
    """The tokenizer named by spec: "qwen2" (embedded vocabulary) or a Hugging Face tokenizer directory or hub id."""
    if spec == "qwen2":
        return _qwen2_tokenizer()
    return _hf_tokenizer(spec)
