"""The embedded Qwen2 tokenizer reproduces Qwen2's ids; Hugging Face tokenizers load behind the same API."""

import hashlib
import importlib.resources
import os
import random
import sys
import types
import unicodedata

import numpy as np
import pytest

from qwen2_dist.data import tokenizer as tokenizer_module
from qwen2_dist.data.tokenizer import load_tokenizer, nfc, qwen2_encoding
from qwen2_dist.errors import UserError

EOS = 151_643


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2")


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, world!", [9707, 11, 1879, 0]),
        ("你好，世界", [108386, 3837, 99489]),
        ("Hello world", [9707, 1879]),
        ("12345", [16, 17, 18, 19, 20]),
    ],
)
def test_known_encodings(tok, text, ids):
    assert tok.encode(text) == ids


def test_vocab_asset_is_the_documented_file():
    data = importlib.resources.files("qwen2_dist").joinpath("assets/qwen.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def test_sizes_and_specials(tok):
    assert tok.name == "qwen2"
    assert tok.eos_id == EOS
    assert tok.vocab_size == 151_646
    assert tok.decode([151_643, 151_644, 151_645]) == "<|endoftext|><|im_start|><|im_end|>"
    assert qwen2_encoding() is qwen2_encoding()


def test_decode_round_trip(tok):
    text = "def f(x):\n\treturn x ** 2  # 平方 🙂\n\n\nI'm   done.\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_encode_batch_matches_encode(tok):
    texts = ["Hello world", "", "你好，世界", "x = 1\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_encode_flat_matches_encode(tok, tmp_path):
    texts = ["Hello world", "a<|endoftext|>b", "cafe\u0301 你好", "x = 1\n"]
    flat, lengths = tok.encode_flat(texts)
    assert flat.dtype == np.int32 and lengths.tolist() == [len(tok.encode(t)) for t in texts]
    assert flat.tolist() == [i for t in texts for i in tok.encode(t)]
    _tiny_hf_tokenizer(tmp_path / "tok")  # the generic path, through encode_batch
    hf = load_tokenizer(str(tmp_path / "tok"))
    flat, lengths = hf.encode_flat(["hello world", "world"])
    assert flat.tolist() == [0, 1, 1] and lengths.tolist() == [2, 1]


def test_special_token_text_is_plain_text(tok):
    text = "a<|endoftext|>b<|im_start|>"
    ids = tok.encode(text)
    assert all(i < EOS for i in ids)
    assert tok.decode(ids) == text


def test_nfc_normalizes_before_encoding(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    assert tok.decode(tok.encode("cafe\u0301")) == "caf\u00e9"


@pytest.mark.parametrize("tables", ["python", "unicodedata2"])
def test_nfc_is_that_of_hugging_face_tokenizers_with_the_unicode_tables_of_any_python(tables, monkeypatch):
    """Qwen2TokenizerFast normalizes with tokenizers' NFC, whose Unicode tables are older than Python's: nfc() gives
    its text with Python's own tables and with unicodedata2's (Unicode 18.0, as a later Python will have), for every
    combining mark after and before a mark of each class tokenizers knows, every canonical decomposition (whole, and
    one level down) composed again, and random mixes of such code points."""
    hf_nfc = pytest.importorskip("tokenizers").normalizers.NFC().normalize_str
    if tables == "unicodedata2":  # which has no is_normalized
        newer = pytest.importorskip("unicodedata2")
        tables = types.SimpleNamespace(normalize=newer.normalize, combining=newer.combining,
                                       decomposition=newer.decomposition,
                                       is_normalized=lambda form, text: newer.normalize(form, text) == text)
    else:
        tables = unicodedata
    monkeypatch.setattr(tokenizer_module, "unicodedata", tables)
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    marks = {}  # one mark of each combining class, as tokenizers knows it (it moves U+0334 or U+0316 before it)
    for c in chars[0x300:0x20000]:
        k = unicodedata.combining(c)
        probe = "x" + c + ("\u0334" if k > 1 else "\u0316")
        if k and k not in marks and hf_nfc(probe) == unicodedata.normalize("NFC", probe) != probe:
            marks[k] = c
    assert len(marks) > 50
    combining = [c for c in chars if tables.combining(c)]
    composed = [c for c in chars if tables.decomposition(c) and not tables.decomposition(c).startswith("<")]
    assert len(combining) > 900 and len(composed) > 2000
    probes = [f"x{c}{m}" for c in combining for m in marks.values()]
    probes += [f"x{m}{c}" for c in combining for m in marks.values()]
    probes += [tables.normalize("NFD", c) for c in composed]
    # Each composite's own decomposition, whose first part may be a composite (U+16121 U+1611F composes to U+16126).
    probes += ["".join(chr(int(part, 16)) for part in tables.decomposition(c).split()) for c in composed]
    pool = combining[::7] + [tables.normalize("NFD", c) for c in composed[::5]] + list("ae\u1100\u1161\u11a8 ")
    rng = random.Random(0)
    probes += ["".join(rng.choices(pool, k=rng.randint(1, 12))) for _ in range(5000)]
    differing = [p for p in probes if nfc(p) != hf_nfc(p)]
    assert not differing, [f"U+{ord(c):04X}" for c in differing[0]]
    # Where Python's own NFC differs from tokenizers' (a negative control: the table is needed with these tables).
    assert sum(tables.normalize("NFC", p) != hf_nfc(p) for p in probes) > 90


def _tiny_hf_tokenizer(path, eos="<|endoftext|>", specials=("<|endoftext|>",)):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"hello": 0, "world": 1, **{token: 2 + i for i, token in enumerate(specials)}, "[UNK]": 2 + len(specials)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.add_special_tokens(list(specials))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token=eos, unk_token="[UNK]")
    hf.save_pretrained(path)


def test_documents_are_separated_by_endoftext_also_where_the_eos_ends_a_chat_turn(tmp_path):
    """A Qwen Instruct (or Qwen2.5) tokenizer's eos is <|im_end|>, the end of a chat turn: pretraining documents are
    separated by <|endoftext|>, as Qwen's are. A tokenizer without it separates them by its eos."""
    _tiny_hf_tokenizer(tmp_path / "instruct", eos="<|im_end|>", specials=("<|endoftext|>", "<|im_end|>"))
    assert load_tokenizer(str(tmp_path / "instruct")).eos_id == 2
    _tiny_hf_tokenizer(tmp_path / "other", eos="</s>", specials=("</s>",))
    assert load_tokenizer(str(tmp_path / "other")).eos_id == 2
    _tiny_hf_tokenizer(tmp_path / "other_order", eos="</s>", specials=("<pad>", "</s>"))
    assert load_tokenizer(str(tmp_path / "other_order")).eos_id == 3


def test_hf_tokenizer_directory(tmp_path):
    _tiny_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.eos_id, tok.vocab_size, tok.name) == (2, 4, str(tmp_path / "tok"))
    assert tok.encode("hello world") == [0, 1]
    # The eos string inside a document stays text (here: unknown word pieces), as with the embedded tokenizer.
    assert tok.encode_batch(["hello <|endoftext|> world"]) == [[0, 3, 3, 3, 1]]
    assert tok.decode([0, 2]) == "hello <|endoftext|>"
    # A batch of no texts (prepare's last range of a file, or one whose records were all skipped) is no error.
    assert tok.encode_batch([]) == []
    flat, lengths = tok.encode_flat([])
    assert flat.tolist() == [] and lengths.tolist() == []


def test_a_tokenizer_directory_is_named_by_its_real_path(tmp_path, monkeypatch):
    """The name prepare_summary.json (and checkpoints, through it) record: qwen2-convert to-hf finds the tokenizer
    again from another working directory."""
    _tiny_hf_tokenizer(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("./tok").name == os.path.realpath(tmp_path / "tok")


def test_hf_tokenizer_missing_directory(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer=.*nope.*tokenizer=qwen2"):
        load_tokenizer(str(tmp_path / "nope"))


def test_hf_tokenizer_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"tokenizer=org/model needs the transformers package"):
        load_tokenizer("org/model")


def test_the_qwen2_tokenizer_written_for_hugging_face_encodes_as_the_embedded_one(tok, tmp_path):
    """qwen2-convert to-hf's tokenizer files: the same ids as tokenizer=qwen2 on text of every kind (code, CJK,
    emoji, digits, whitespace runs, contractions, text NFC changes), and Qwen2's special ids, eos = pad, no bos."""
    from transformers import AutoTokenizer

    from qwen2_dist.data.tokenizer import save_qwen2_hf_tokenizer

    save_qwen2_hf_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello, world!", "你好，世界", "12345 and 3.14159", "e\u0301te\u0301 Å", "  runs   of\n\n\tspace  ",
             "I'm they'LL WE'VE it's", "emoji 😀👍🏽 Ω≈ç√", "def f(x):\r\n    return x**2  # done\n"]
    with open(__file__, encoding="utf-8") as f:
        texts.append(f.read().replace("<|", "< |"))  # (special-token strings in text: below)
    # The slow tokenizer (use_fast=False), from vocab.json and merges.txt.
    slow = AutoTokenizer.from_pretrained(tmp_path, use_fast=False)
    assert type(slow).__name__ == "Qwen2Tokenizer"
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert slow.encode(text, add_special_tokens=False) == tok.encode(text), text
    # Marks newer than tokenizers' Unicode tables, which Python's NFC moves or composes: the fast tokenizer's ids (the
    # slow one normalizes with Python's tables).
    newer = "x\u0301\U00016FF0 \u0928\u093c\u1ac1\u0300 \U00011935\U00011930 \U000105D2\u0307 e\u0301"
    assert hf.encode(newer, add_special_tokens=False) == tok.encode(newer) != tok.encode(
        unicodedata.normalize("NFC", newer))
    assert [hf.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, 151644, 151645] == [slow.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                                            "<|im_end|>")]
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, len(hf)) == (151643, 151643, None, 151646)
    assert set(hf("hi")) == {"input_ids", "attention_mask"}  # no token_type_ids, which generate() refuses
    # Qwen2's own tokenizer class, which transformers 4 and 5 both load (5's generic class name 4 cannot):
    # checked by hand on 2026-12-05 with files written by 4.57.6 and 5.17.0, each loaded by both.
    assert type(hf).__name__.startswith("Qwen2Tokenizer")
    # The one difference, as Qwen2's own tokenizer files have it: special-token strings in text are the specials.
    assert hf.encode("a<|endoftext|>", add_special_tokens=False) == tok.encode("a") + [151643]
