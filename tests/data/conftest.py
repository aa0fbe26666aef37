"""Small corpora built once per session: a few text files and a CLUENER subset."""

from __future__ import annotations

import os

import pytest

from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER

CLUENER_TRAIN_LINES = 400
CLUENER_DEV_LINES = 90


def cluener_lines(split: str, count: int) -> list[bytes]:
    with open(os.path.join(CLUENER_DIR, f"{split}.jsonl"), "rb") as f:
        return [line for _, line in zip(range(count), f, strict=False)]


requires_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> str:
    """24 text files (two nested directories, one empty file); returns the glob."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        directory = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"file {i} line {j}: {'é' * (j % 3)} value = {i * j}\n" for j in range(5 + i)]
        (directory / f"f{i:02d}.txt").write_text("".join(lines), encoding="utf-8")
    (root / "a" / "empty.txt").write_bytes(b"")
    (root / "a" / "skip.bin").write_bytes(b"\x00\xff")
    return str(root / "**" / "*.txt")


@pytest.fixture(scope="session")
def cluener_subset(tmp_path_factory) -> str:
    """The first lines of the official train/dev files, as a manual directory."""
    if not HAVE_CLUENER:
        pytest.skip(CLUENER_MISSING)
    directory = tmp_path_factory.mktemp("cluener_manual")
    (directory / "train.jsonl").write_bytes(b"".join(cluener_lines("train", CLUENER_TRAIN_LINES)))
    (directory / "dev.jsonl").write_bytes(b"".join(cluener_lines("dev", CLUENER_DEV_LINES)))
    return str(directory)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS data directory shared by the pipeline tests."""
    return str(tmp_path_factory.mktemp("tfds"))
