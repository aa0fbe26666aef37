"""`WordPieceTokenizer`: BERT WordPiece ids and character offsets, and span mapping."""

from __future__ import annotations

import collections
import json
import os
import re
import unicodedata

import numpy as np
import pytest

from kexue.data import WordPieceTokenizer, char_to_token_spans, token_to_char_spans
from kexue.data.tokenizers import Tokenizer
from tests.conftest import CLUENER_DIR

DEV = os.path.join(CLUENER_DIR, "dev.jsonl")
requires_dev = pytest.mark.skipif(not os.path.isfile(DEV), reason=(
    f"CLUENER dev.jsonl not found in {CLUENER_DIR} (set KEXUE_CLUENER_DIR to a copy of "
    "the dataset)"))
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def dev_records() -> list[dict]:
    with open(DEV, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cluener_vocab(texts: list[str], rng: np.random.Generator) -> list[str]:
    """A BERT-style vocabulary: control tokens, CLUENER's characters (a random 3% left
    out, so `[UNK]` occurs), frequent English / digit words and `##` pieces."""
    chars = sorted(set("".join(texts)) | set("".join(texts).lower()))
    chars = [c for c in chars if not c.isspace() and rng.random() > 0.03]
    words = collections.Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower()))
    whole = [w for w, _ in words.most_common(80) if len(w) > 1]
    pieces = {"##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"}
    pieces |= {"##" + w[1:3] for w in sorted(words) if len(w) > 2}
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 8)] + ["[UNK]", "[CLS]", "[SEP]",
             "[MASK]", "<S>", "<T>"] + chars + whole + sorted(pieces))
    return list(dict.fromkeys(vocab))


def reference_tokenizers(directory: str, lowercase: bool):
    """Hugging Face's fast BERT tokenizer and its pure-Python one (an independent
    implementation of the same algorithm)."""
    transformers = pytest.importorskip("transformers", reason="the reference tokenizers "
                                       "need transformers (pip install -e '.[test]')")
    fast = transformers.BertTokenizerFast.from_pretrained(directory, do_lower_case=lowercase)
    try:  # transformers 5 keeps the pure-Python tokenizer as "legacy"
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
        python = BertTokenizerLegacy(os.path.join(directory, "vocab.txt"),
                                     do_lower_case=lowercase)
    except ImportError:
        python = transformers.BertTokenizer(os.path.join(directory, "vocab.txt"),
                                            do_lower_case=lowercase)
    return fast, python


def normalize(text: str, lowercase: bool) -> str:
    """BERT's normalisation of one token's text (lower-case, then strip accents)."""
    if not lowercase:
        return text
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


@requires_dev
@pytest.mark.parametrize("lowercase", [True, False])
def test_ids_and_offsets_equal_the_reference_on_cluener_dev(rng, tmp_path, lowercase):
    texts = [r["text"] for r in dev_records()]
    vocab = cluener_vocab(texts, rng)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = WordPieceTokenizer(tmp_path / "vocab.txt", lowercase=lowercase)
    fast, python = reference_tokenizers(str(tmp_path), lowercase)
    unknown = 0
    for text in texts:
        ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=True)
        reference = fast(text, return_offsets_mapping=True)
        assert ids.tolist() == reference["input_ids"], text
        assert offsets.tolist() == [list(o) for o in reference["offset_mapping"]], text
        assert ids.tolist() == python(text)["input_ids"], text
        # offsets point at the characters each token spells (after BERT's normalisation)
        for token_id, (start, end) in zip(ids[1:-1], offsets[1:-1], strict=True):
            token = vocab[token_id]
            if token == "[UNK]":
                unknown += 1
                continue
            piece = token.removeprefix("##")
            assert normalize(text[start:end], lowercase) == piece, (text, token, start, end)
    assert unknown > 0  # the left-out characters were met


def test_protocol_attributes_and_special_tokens(tmp_path):
    vocab = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "中", "国",
             "人", "hello", "##s", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = WordPieceTokenizer(str(tmp_path / "vocab.txt"))
    for attribute in Tokenizer.__annotations__:  # the protocol the pipelines use
        assert hasattr(tokenizer, attribute), attribute
    assert callable(tokenizer.encode) and callable(tokenizer.decode)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
            tokenizer.mask_id) == (0, 2, 3, 4, 5)
    assert tokenizer.vocab_size == len(vocab)
    assert tokenizer.regular_ids == (7, len(vocab))
    ids = tokenizer.encode("中国人 Hellos X")
    assert ids.dtype == np.int32
    assert ids.tolist() == [7, 8, 9, 10, 11, 2]
    wrapped = tokenizer.encode("中国".encode(), add_special_tokens=True)
    assert wrapped.tolist() == [3, 7, 8, 4]
    ids, offsets = tokenizer.encode_with_offsets("  中国", add_special_tokens=True)
    assert offsets.tolist() == [[0, 0], [2, 3], [3, 4], [0, 0]]
    assert tokenizer.decode([3, 7, 8, 10, 11, 0, 0]) == "中 国 hellos"
    # a special token at the end of the vocabulary closes the regular range
    moved = WordPieceTokenizer(vocab[:5] + vocab[6:] + ["[MASK]"])
    assert moved.regular_ids == (6, len(vocab) - 1) and moved.mask_id == len(vocab) - 1


def test_empty_text_and_vocabulary_errors():
    tokenizer = WordPieceTokenizer([*SPECIALS, "a"])
    ids, offsets = tokenizer.encode_with_offsets("")
    assert ids.shape == (0,) and offsets.shape == (0, 2)
    with pytest.raises(ValueError, match=r"missing \['\[CLS\]', '\[MASK\]'\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[SEP]", "a"])
    with pytest.raises(ValueError, match="empty vocabulary"):
        WordPieceTokenizer([])


# ------------------------------------------------------------------------ span mapping


def random_offsets(rng, n_tokens: int) -> np.ndarray:
    """Increasing, non-overlapping token offsets with gaps (dropped characters) and
    multi-character tokens; a `[CLS]`-like `(0, 0)` first."""
    lengths = rng.integers(1, 4, n_tokens)
    gaps = rng.integers(0, 2, n_tokens)
    starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
    return np.concatenate([[[0, 0]], np.stack([starts, starts + lengths], 1)])


def test_char_to_token_spans_picks_the_overlapping_tokens(rng):
    offsets = random_offsets(rng, 12)
    text_length = int(offsets[-1, 1]) + 2
    spans = []
    for _ in range(40):
        a = int(rng.integers(0, text_length))
        spans.append([int(rng.integers(0, 5)), a, int(rng.integers(a, text_length))])
    spans.append([-1, -1, -1])
    got = char_to_token_spans(offsets, np.array(spans))
    for (kind, a, b), row in zip(spans, got.tolist(), strict=True):
        overlapping = [i for i, (s, e) in enumerate(offsets.tolist())
                       if e > s and s <= b and e > a]
        if kind < 0 or not overlapping:
            assert row == [-1, -1, -1]
        else:
            assert row == [kind, min(overlapping), max(overlapping)]


def test_token_spans_round_trip_through_characters(rng):
    offsets = random_offsets(rng, 15)
    i = rng.integers(1, 16, 30)
    j = np.minimum(i + rng.integers(0, 4, 30), 15)
    spans = np.stack([rng.integers(0, 3, 30), i, j], 1)
    chars = token_to_char_spans(offsets, spans)
    np.testing.assert_array_equal(chars[:, 1], offsets[i, 0])
    np.testing.assert_array_equal(chars[:, 2], offsets[j, 1] - 1)
    np.testing.assert_array_equal(char_to_token_spans(offsets, chars), spans)
    bad = np.array([[0, 3, 2], [1, 0, 0], [2, 5, 99], [-1, 1, 1]])  # j < i, [CLS], past n
    np.testing.assert_array_equal(token_to_char_spans(offsets, bad), -np.ones((4, 3)))


@requires_dev
def test_cluener_entities_map_to_tokens_and_back(rng, tmp_path):
    records = dev_records()
    texts = [r["text"] for r in records]
    tokenizer = WordPieceTokenizer(cluener_vocab(texts, rng))
    exact = total = 0
    for record in records:
        _, offsets = tokenizer.encode_with_offsets(record["text"], add_special_tokens=True)
        spans = np.array([[k, s, e] for k, label in enumerate(sorted(record["label"]))
                          for places in record["label"][label].values() for s, e in places])
        tokens = char_to_token_spans(offsets, spans)
        assert (tokens >= 0).all()  # every entity covers some token
        back = token_to_char_spans(offsets, tokens)
        # the characters recovered contain the entity; equal when it starts and ends
        # on token boundaries (always, except inside an English word piece)
        assert (back[:, 1] <= spans[:, 1]).all() and (back[:, 2] >= spans[:, 2]).all()
        exact += int((back == spans).all(axis=1).sum())
        total += len(spans)
    print(f"CLUENER dev: {exact}/{total} entity spans map back exactly")
    assert exact / total > 0.98
