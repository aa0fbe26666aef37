"""Byte and char tokenizers: round trips, specials, vocabulary files."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kexue.data.tokenizers import SPECIAL_TOKENS, ByteTokenizer, CharTokenizer


@given(st.text(max_size=200))
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
    assert tokenizer.decode(ids) == text


def test_byte_specials_are_outside_bytes_and_dropped():
    tokenizer = ByteTokenizer()
    specials = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                tokenizer.mask_id]
    assert sorted(specials) == list(range(256, 261)) and tokenizer.vocab_size == 261
    assert tokenizer.regular_ids == (0, 256)
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode("héllo"), specials])
    assert tokenizer.decode(ids) == "héllo"
    assert tokenizer.decode_bytes(tokenizer.encode(b"\xff\x00")) == b"\xff\x00"


@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8))
def test_char_round_trip_on_its_own_texts(texts):
    tokenizer = CharTokenizer.build(texts)
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and len(ids) == len(text)
        assert ids.min() >= len(SPECIAL_TOKENS)
        assert tokenizer.decode(ids) == text


def test_char_vocabulary_order_and_min_count():
    texts = ["abcab", "cbz", "aa"]
    counts = collections.Counter("".join(texts))  # a:4 b:3 c:2 z:1
    tokenizer = CharTokenizer.build(texts, min_count=2)
    assert tokenizer.chars == ("a", "b", "c")
    assert all(counts[c] >= 2 for c in tokenizer.chars)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.mask_id) == (0, 1, 4)
    assert tokenizer.vocab_size == len(SPECIAL_TOKENS) + 3
    ids = tokenizer.encode("az?")
    assert ids.tolist() == [5, tokenizer.unk_id, tokenizer.unk_id]
    assert tokenizer.decode(ids) == "a\ufffd\ufffd"
    # Ties are broken by code point, so the order depends only on the counts.
    assert CharTokenizer.build(["yx", "xy"]).chars == ("x", "y")


def test_char_vocabulary_save_load(tmp_path):
    tokenizer = CharTokenizer.build(["中文字符 and ascii", "标点，。"])
    path = tmp_path / "vocab.json"
    tokenizer.save(path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["specials"] == list(SPECIAL_TOKENS)
    loaded = CharTokenizer.load(path)
    assert loaded.chars == tokenizer.chars
    text = "中文 ascii，。"
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))


def test_char_vocabulary_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON vocabulary"):
        CharTokenizer.load(path)
    path.write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"not a kexue\.char_vocab file"):
        CharTokenizer.load(path)
    with pytest.raises(ValueError, match="repeats characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single character"):
        CharTokenizer(["ab"])
