"""Fuzz the text-corpus path end to end: arbitrary files in, batches or a ValueError out.

Issue 6 asks that no input makes the corpus builder fail with anything but a clear
`ValueError`: file names with odd characters, empty files, bytes that are not UTF-8,
fewer files than splits.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kexue.data import make_dataset

_names = st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00",
                               exclude_categories=("Cs",)), min_size=1, max_size=12)
_files = st.dictionaries(_names, st.binary(max_size=300), min_size=0, max_size=4)


def _batches(files: dict[str, bytes], eval_fraction: float, seq_len: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus")
        corpus.mkdir()
        for name, content in files.items():
            if name in (".", ".."):
                continue
            (corpus / f"{name}.txt").write_bytes(content)
        data = {"name": "text_files", "pattern": str(corpus / "*.txt"),
                "data_dir": str(Path(tmp, "tfds")), "eval_fraction": eval_fraction,
                "task": "lm", "tokenizer": "byte", "seq_len": seq_len, "batch_size": 2,
                "num_threads": 1, "prefetch": 1}
        batches = make_dataset(data, "train", process_index=0, process_count=1)
        return list(itertools.islice(batches, 2))


def test_odd_but_valid_files_build():
    """Not UTF-8, empty, unicode names: still a corpus (bytes are bytes)."""
    files = {"a": b"def f():\n    return 1\n" * 20, "\u00e9\u4e2d": b"\xff\xfe\x00 raw",
             "empty": b""}
    for batch in _batches(files, 0.0, 8):
        assert batch["tokens"].shape == (2, 9) and batch["tokens"].min() >= 0


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files, eval_fraction=st.sampled_from([0.0, 0.3, 0.9]),
       seq_len=st.sampled_from([1, 8]))
@example(files={}, eval_fraction=0.0, seq_len=8)
def test_text_corpus_builds_or_raises_value_error(files, eval_fraction, seq_len):
    try:
        batches = _batches(files, eval_fraction, seq_len)
    except ValueError as error:
        assert str(error)  # e.g. no files, or no tokens in the train split
        return
    for batch in batches:
        assert batch["tokens"].shape == (2, seq_len + 1)
        assert batch["tokens"].min() >= 0


def test_no_files_is_a_clear_error():
    with pytest.raises(ValueError, match="no files match"):
        _batches({}, 0.0, 8)


def test_a_split_without_text_is_left_out_and_named_when_asked_for(tmp_path):
    """eval_fraction=0 holds nothing out: no `validation` split, and asking says so."""
    (tmp_path / "a.txt").write_bytes(b"hello world\n" * 20)
    data = {"name": "text_files", "pattern": str(tmp_path / "*.txt"),
            "data_dir": str(tmp_path / "tfds"), "eval_fraction": 0.0, "task": "lm",
            "seq_len": 8, "batch_size": 2, "num_threads": 1, "prefetch": 1}
    assert next(make_dataset(data, "train", process_index=0, process_count=1))["tokens"].shape \
        == (2, 9)
    with pytest.raises(ValueError, match="validation"):
        make_dataset(data, "eval", process_index=0, process_count=1)
    (tmp_path / "a.txt").write_bytes(b"")
    data["data_dir"] = str(tmp_path / "tfds2")
    with pytest.raises(ValueError, match="no training text"):
        make_dataset(data, "train", process_index=0, process_count=1)
