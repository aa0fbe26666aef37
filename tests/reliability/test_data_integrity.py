"""Prepared datasets follow their sources; host memory does not follow the size of a file.

* Rewriting a corpus file or adding one rebuilds the text-files dataset; rewriting one
  with its size and modification time restored needs `data.rebuild=True`, which
  rebuilds. Pointing `data.manual_dir` at other CLUENER files (fewer lines, shifted
  spans) gives those files, not the first build.
* A file longer than `data.chunk_bytes` is stored in parts; the LM windows, train and
  eval, resumed or not, equal those of the same corpus stored whole, and the eval
  stream holds every file once (checked against the files themselves).
* Peak host memory while batching a 48 MB single-file corpus stays within a bound set
  by the batch and prefetch sizes (the whole file, tokenized, would be 200 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kexue.data import ByteTokenizer, list_text_files, make_builder, make_dataset, prepare
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER
from tests.reliability.kill_resume import ROOT, worker_env


def _contents(data_dir, pattern, **kwargs) -> dict[str, bytes]:
    builder = prepare(make_builder("text_files", data_dir, pattern=pattern, eval_fraction=0.0),
                      **kwargs)
    source = builder.as_data_source("train")
    return {bytes(source[i]["path"]).decode(): bytes(source[i]["content"])
            for i in range(len(source))}


def test_changed_text_corpus_is_rebuilt(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(f"first version of {name}\n")
    pattern, data_dir = str(corpus / "*.txt"), str(tmp_path / "tfds")
    assert _contents(data_dir, pattern)["a.txt"] == b"first version of a.txt\n"

    (corpus / "a.txt").write_text("second version of a.txt, longer\n")
    (corpus / "c.txt").write_text("a new file\n")
    assert _contents(data_dir, pattern) == {"a.txt": b"second version of a.txt, longer\n",
                                           "b.txt": b"first version of b.txt\n",
                                           "c.txt": b"a new file\n"}

    stat = os.stat(corpus / "b.txt")  # same size, same modification time: looks unchanged
    (corpus / "b.txt").write_text("FIRST version of b.txt\n")
    os.utime(corpus / "b.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _contents(data_dir, pattern)["b.txt"] == b"first version of b.txt\n"
    assert _contents(data_dir, pattern, rebuild=True)["b.txt"] == b"FIRST version of b.txt\n"


needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


def _manual_dir(path, train_lines: list[bytes], dev_lines: list[bytes]) -> str:
    path.mkdir()
    (path / "train.jsonl").write_bytes(b"".join(train_lines))
    (path / "dev.jsonl").write_bytes(b"".join(dev_lines))
    return str(path)


def _shift(line: bytes) -> bytes:
    """The record with one character put in front of the text and every span moved by one."""
    record = json.loads(line)
    record["text"] = "X" + record["text"]
    record["label"] = {kind: {name: [[s + 1, e + 1] for s, e in spans]
                              for name, spans in entities.items()}
                       for kind, entities in record["label"].items()}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


@needs_cluener
def test_other_cluener_files_are_not_served_from_an_older_build(tmp_path):
    with open(os.path.join(CLUENER_DIR, "train.jsonl"), "rb") as file:
        train = [line for _, line in zip(range(200), file, strict=False)]
    with open(os.path.join(CLUENER_DIR, "dev.jsonl"), "rb") as file:
        dev = [line for _, line in zip(range(40), file, strict=False)]
    first = _manual_dir(tmp_path / "first", train, dev)
    fewer = _manual_dir(tmp_path / "fewer", train[:120], dev)
    shifted = _manual_dir(tmp_path / "shifted", [_shift(line) for line in train], dev)
    data_dir = str(tmp_path / "tfds")

    def examples(manual_dir):
        config = dict(name="cluener", task="ner", tokenizer="char", data_dir=data_dir,
                      manual_dir=manual_dir, seq_len=64, batch_size=8, num_threads=0,
                      shuffle=False)
        it = make_dataset(config, "train", process_index=0, process_count=1)
        return it.metadata.num_examples, next(it)

    count, batch = examples(first)
    assert count == 200
    assert examples(fewer)[0] == 120
    count, moved = examples(shifted)
    assert count == 200
    # Rows (type, start, end): every span of the shifted copy starts and ends one later;
    # a span that would end past the last of the 64 positions is dropped with it.
    real = batch["spans"][..., 0] >= 0
    gold = batch["spans"][real]
    keep = gold[:, 2] < 64 - 1
    moved_rows = moved["spans"][moved["spans"][..., 0] >= 0]
    expected = gold[keep] + np.array([0, 1, 1])
    assert sorted(map(tuple, moved_rows.tolist())) == sorted(map(tuple, expected.tolist()))


# ----------------------------------------------------------------------------- parts


def _write_corpus(root, rng) -> str:
    """Five files of 1.5k-4.5k characters mixing ASCII and 2-, 3- and 4-byte UTF-8 ones."""
    alphabet = [*"abcdefghij klmnop\n", "é", "ß", "中", "文", "😀"]
    root.mkdir()
    for i in range(5):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1500, 4500))))
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return str(root / "*.txt")


def _lm(data_dir, pattern, chunk_bytes, **overrides):
    config = dict(data_dir=data_dir, pattern=pattern, eval_fraction=0.4, seq_len=24,
                  batch_size=4, num_threads=0, seed=7, chunk_bytes=chunk_bytes)
    config.update(overrides)
    return config


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_documents_in_parts_give_the_windows_of_whole_documents(tmp_path, rng, tokenizer):
    pattern = _write_corpus(tmp_path / "corpus", rng)
    data_dir = str(tmp_path / "tfds")
    whole = _lm(data_dir, pattern, 1 << 20, tokenizer=tokenizer)
    parts = _lm(data_dir, pattern, 700, tokenizer=tokenizer)  # 3-13 parts per file
    builder = make_builder("text_files", data_dir, pattern=pattern, eval_fraction=0.4,
                           chunk_bytes=700)
    prepare(builder)
    assert all(builder.info.metadata["multipart_documents"].values())

    def batches(config, split, count=None, state=None):
        it = make_dataset(config, split, process_index=0, process_count=1)
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(count)] if count else list(it), it

    for split, count in (("train", 60), ("eval", None)):  # train: past one epoch
        expected, _ = batches(whole, split, count)
        got, _ = batches(parts, split, count)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["weights"], b["weights"])
    _, it = batches(parts, "train", 17)
    resumed, _ = batches(parts, "train", 11, state=it.get_state())
    again, _ = batches(parts, "train", 28)
    for a, b in zip(resumed, again[17:], strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])

    if tokenizer == "byte":  # the eval stream holds every held-out file once, whole
        eos = ByteTokenizer().eos_id
        got, _ = batches(parts, "eval")
        tokens = np.concatenate([b["tokens"] for b in got])
        weights = np.concatenate([b["weights"] for b in got])
        stream = np.concatenate([tokens[:1, 0], tokens[:, 1:][weights > 0]])
        pieces = [piece[piece != eos] for piece in np.split(stream, np.flatnonzero(stream == eos))]
        documents = [bytes(piece.astype(np.uint8).tolist()) for piece in pieces if piece.size]
        files = list_text_files(pattern, eval_fraction=0.4)["validation"]
        assert sorted(documents) == sorted(open(path, "rb").read() for _, path in files)


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from kexue.data import make_dataset
    config = json.loads(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    it = make_dataset(config, "train", process_index=0, process_count=1)
    for _ in range(int(sys.argv[2])):
        next(it)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
""")


def test_peak_memory_of_a_one_file_corpus_is_bounded_by_batch_and_prefetch(tmp_path, rng):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    big = 48 << 20
    line = (b"def function(x):\n    return x * 2  # some text to train on\n" * 1000)
    with open(corpus / "big.txt", "wb") as file:
        for _ in range(big // len(line)):
            file.write(line)
    (corpus / "small.txt").write_bytes(b"small file\n" * 10)
    (corpus / "tiny.txt").write_bytes(b"tiny file\n" * 10)
    pattern = str(corpus / "*.txt")
    splits = list_text_files(pattern, eval_fraction=0.05)
    assert "big.txt" in [relative for relative, _ in splits["train"]], splits
    config = dict(data_dir=str(tmp_path / "tfds"), pattern=pattern, seq_len=128,
                  batch_size=16, num_threads=2, prefetch=16)
    try:
        prepare(make_builder("text_files", config["data_dir"], pattern=pattern))  # built here
        result = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(config), "40"],
                                cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                                timeout=300, check=False)
    finally:  # 100 MB of corpus and dataset
        shutil.rmtree(corpus)
        shutil.rmtree(config["data_dir"], ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    grown_mib = (rss["after_kib"] - rss["before_kib"]) / 1024
    # 16 prefetched parts of 1 MiB as int32 tokens (64 MiB) plus the reader's copies;
    # the whole file tokenized would be 192 MiB, twice that while concatenating.
    print(f"peak RSS grew {grown_mib:.0f} MiB while batching ({rss})")
    assert grown_mib < 150, rss
