"""TFDS builders: array_record written and read back without TensorFlow; the file split."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
import textwrap

import pytest

from kexue.data import held_out_start, list_text_files, make_builder, prepare, text_files_config
from kexue.data.text_files import _eval_score
from tests.conftest import HAVE_CLUENER


def test_text_files_split_is_a_hash_partition(text_corpus):
    splits = list_text_files(text_corpus, eval_fraction=0.25)
    root = os.path.dirname(os.path.dirname(text_corpus))
    expected = sorted(os.path.relpath(p, root) for p in glob.glob(text_corpus, recursive=True))
    train = [rel for rel, _ in splits["train"]]
    held_out = [rel for rel, _ in splits["validation"]]
    assert sorted(train + held_out) == expected and not set(train) & set(held_out)
    assert all(_eval_score(rel) < 0.25 for rel in held_out)
    assert all(_eval_score(rel) >= 0.25 for rel in train)
    assert list_text_files(text_corpus, eval_fraction=0.25) == splits  # deterministic
    # Excluding a directory drops exactly its files.
    without_deep = list_text_files(text_corpus, eval_fraction=0.25, exclude=("deep",))
    kept = [rel for entries in without_deep.values() for rel, _ in entries]
    assert sorted(kept) == [rel for rel in expected if "deep" not in rel.split(os.sep)]


def test_text_files_split_edge_cases(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        list_text_files(str(tmp_path / "*.none"))
    with pytest.raises(ValueError, match="eval_fraction"):
        list_text_files(str(tmp_path / "*.txt"), eval_fraction=1.0)
    for name in ("x.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    for fraction in (1e-9, 0.999):  # both splits get a file whenever there are two
        splits = list_text_files(str(tmp_path / "*.txt"), eval_fraction=fraction)
        assert len(splits["train"]) == len(splits["validation"]) == 1


def test_config_names_follow_the_corpus(text_corpus):
    a = text_files_config(text_corpus, eval_fraction=0.25)
    assert a.name == text_files_config(text_corpus, eval_fraction=0.25).name
    assert a.name != text_files_config(text_corpus, eval_fraction=0.5).name
    assert a.name != text_files_config(text_corpus.replace("*.txt", "f*.txt"),
                                       eval_fraction=0.25).name


def test_text_files_round_trip(text_corpus, tmp_path):
    builder = prepare(make_builder("text_files", str(tmp_path), pattern=text_corpus,
                                   eval_fraction=0.25))
    splits = list_text_files(text_corpus, eval_fraction=0.25)
    for split, files in splits.items():
        source = builder.as_data_source(split)
        stored = {source[i]["path"].decode(): source[i]["content"] for i in range(len(source))}
        expected = {}
        for rel, path in files:
            with open(path, "rb") as f:
                expected[rel] = f.read()
        empty = sorted(rel for rel, content in expected.items() if not content)
        assert stored == {rel: c for rel, c in expected.items() if c}
        assert builder.info.metadata["empty_files"][split] == len(empty)
    # A second builder finds the files instead of rebuilding.
    again = make_builder("text_files", str(tmp_path), pattern=text_corpus, eval_fraction=0.25)
    assert again.is_prepared()


def test_builders_work_without_importing_tensorflow(text_corpus, tmp_path, request):
    """Build, read and batch in a fresh interpreter; TensorFlow must never be imported
    (the venv has none, and where it is installed the NumPy path must still be used)."""
    cluener = None
    if HAVE_CLUENER:
        cluener = request.getfixturevalue("cluener_subset")
    script = textwrap.dedent(f"""
        import sys
        from kexue.data import make_builder, make_dataset, prepare
        b = prepare(make_builder("text_files", {str(tmp_path)!r}, pattern={text_corpus!r}))
        assert len(b.as_data_source("train")) > 0
        assert isinstance(b.as_data_source("validation")[0]["content"], bytes)
        config = dict(data_dir={str(tmp_path)!r}, pattern={text_corpus!r}, seq_len=8,
                      batch_size=2, num_threads=0)
        assert next(make_dataset(config, "train", process_index=0, process_count=1))[
            "tokens"].shape == (2, 9)
        if {cluener!r} is not None:
            c = prepare(make_builder("cluener", {str(tmp_path)!r}), manual_dir={cluener!r})
            assert c.as_data_source("validation")[0]["text"]
        assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=os.getcwd(), timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_default_cluener_dir_prefers_the_repository_copy(tmp_path, monkeypatch):
    """`<repo>/.data/cluener` (the copy that travels with the repository) before
    `<repo>/../shared/data/cluener`; a directory without `train.jsonl` does not count."""
    from kexue.data import sources

    repo, shared = tmp_path / "repo", tmp_path / "shared" / "data" / "cluener"
    own = repo / ".data" / "cluener"
    for path in (own, shared):
        path.mkdir(parents=True)
    monkeypatch.setattr(sources, "repo_root", lambda: str(repo))
    assert sources.default_cluener_dir() is None
    (shared / "train.jsonl").write_text("{}\n")
    assert sources.default_cluener_dir() == str(shared)
    (own / "train.jsonl").write_text("{}\n")
    assert sources.default_cluener_dir() == str(own)


def held_out_reference(lines: list[bytes], fraction: float) -> int:
    """The last line start at or before byte `size - ceil(fraction · size)`, else that byte."""
    size = sum(len(line) for line in lines)
    target = size - math.ceil(fraction * size)
    if target >= size:
        return size
    starts = [sum(len(line) for line in lines[:i]) for i in range(len(lines))]
    start = max(s for s in starts if s <= target)
    return start if start > 0 else target


def test_held_out_start_is_the_line_start_before_the_tail(rng):
    lines = [b"x" * int(n) + b"\n" for n in rng.integers(0, 30, size=int(rng.integers(5, 40)))]
    content = b"".join(lines)
    for fraction in (float(rng.uniform(0.01, 0.5)), 0.0, 0.999):
        cut = held_out_start(content, fraction)
        assert cut == held_out_reference(lines, fraction), fraction
        assert len(content) - cut >= math.ceil(fraction * len(content))
    assert held_out_start(b"one line without a newline", 0.5) == 13


def test_held_out_cut_of_a_file_reads_backwards_to_the_same_line_start(rng, tmp_path):
    """The builder's cut (reading the file backwards in blocks, here 7 bytes) is the
    reference's line start, also when the line holding the cut spans several blocks."""
    from kexue.data.text_files import _held_out_cut

    lines = [b"y" * int(n) + b"\n" for n in rng.integers(0, 40, size=int(rng.integers(5, 30)))]
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    for fraction in (float(rng.uniform(0.01, 0.6)), 0.0, 0.5, 0.999):
        assert _held_out_cut(str(path), size, fraction, block=7) == \
            held_out_reference(lines, fraction), fraction


def test_a_single_file_is_split_by_bytes(tmp_path):
    text = b"".join(f"line {i}\n".encode() for i in range(100))
    (tmp_path / "only.txt").write_bytes(text)
    builder = prepare(make_builder("text_files", str(tmp_path / "tfds"),
                                   pattern=str(tmp_path / "only.txt"), eval_fraction=0.1))
    train = builder.as_data_source("train")
    held = builder.as_data_source("validation")
    assert len(train) == len(held) == 1
    head, tail = train[0]["content"], held[0]["content"]
    assert head + tail == text and len(tail) >= 0.1 * len(text) and tail.startswith(b"line ")
