"""CLUENER 2020 (Chinese fine-grained NER, 10 entity types) as a TFDS builder.

The official files are JSON lines, one sentence per line:

    {"text": "...", "label": {type: {entity_text: [[start, end], ...]}}}

with character offsets and `end` inclusive. `parse_cluener_line` checks a line and
returns the text and its spans `(type_index, start, end)`; `read_cluener_file` adds
the file name and line number to every problem. The builder `Cluener` writes
`array_record` files readable with `builder.as_data_source()` (no TensorFlow). It
reads `{train,dev}.jsonl` (or `.json`) from the download config's `manual_dir`, and
only when none is given downloads the official archive `CLUENER_URL`. Built from a
manual directory, the config (`cluener_config`) is named after a SHA-256 of the two
files' contents, so other or edited files are never served from an older build.

Malformed records stop the build with a `MalformedRecordError` (a `ValueError`)
naming the file, the line and the problem; with `skip_bad_records=True` they are
skipped, logged and counted in `builder.info.metadata["skipped_records"]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

__all__ = [
    "CLUENER_TYPES",
    "CLUENER_URL",
    "Cluener",
    "CluenerConfig",
    "MalformedRecordError",
    "cluener_config",
    "cluener_files",
    "parse_cluener_line",
    "read_cluener_file",
]

CLUENER_URL = "https://storage.googleapis.com/cluebenchmark/tasks/cluener_public.zip"
CLUENER_TYPES: tuple[str, ...] = (
    "address", "book", "company", "game", "government",
    "movie", "name", "organization", "position", "scene",
)
_SPLIT_FILES = {"train": "train", "validation": "dev"}
_MAX_REPORTED = 100  # problems listed in the metadata; all of them are counted


class MalformedRecordError(ValueError):
    """A record that cannot be used; `str(error)` is `"<path>:<line>: <problem>"`."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_cluener_line(
    line: str | bytes, *, types: Sequence[str] = CLUENER_TYPES
) -> tuple[str, list[tuple[int, int, int]]]:
    """Parses and checks one CLUENER JSON line.

    Args:
      line: the line, as text or as raw bytes (which must be UTF-8).
      types: the entity types; a label outside them is an error.

    Returns:
      `(text, spans)`, spans sorted `(type_index, start, end)` with `end` inclusive
      and `text[start:end + 1]` the entity (repeated spans are kept once).

    Raises:
      ValueError: with the problem (not UTF-8, bad JSON, missing or mistyped field,
        unknown label, span outside the text, span text mismatch). No other exception
        escapes, whatever the input.
    """
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"not valid UTF-8 (byte {error.start})") from None
    if not line.strip():
        raise ValueError("empty line")
    try:
        record = json.loads(line)
    except RecursionError:
        raise ValueError("bad JSON: nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"bad JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise ValueError(f"field 'text' must be a non-empty string, got {text!r:.80}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("field 'text' contains unpaired surrogates") from None
    labels = record.get("label")
    if not isinstance(labels, dict):
        raise ValueError(f"field 'label' must be an object, got {labels!r:.80}")
    type_index = {name: i for i, name in enumerate(types)}
    spans: set[tuple[int, int, int]] = set()
    for label, entities in labels.items():
        if label not in type_index:
            raise ValueError(f"unknown label {label!r} (known: {', '.join(types)})")
        if not isinstance(entities, dict):
            raise ValueError(f"label {label!r}: expected an object of entities")
        for entity, positions in entities.items():
            if not isinstance(positions, list):
                raise ValueError(f"entity {entity!r:.40}: expected a list of [start, end]")
            for pair in positions:
                if not (isinstance(pair, list) and len(pair) == 2
                        and _is_int(pair[0]) and _is_int(pair[1])):
                    raise ValueError(
                        f"entity {entity!r:.40}: span {pair!r:.40} is not [start, end] integers"
                    )
                start, end = pair
                if not 0 <= start <= end < len(text):
                    raise ValueError(
                        f"span [{start}, {end}] of {entity!r:.40} outside the text "
                        f"(length {len(text)})"
                    )
                if text[start:end + 1] != entity:
                    raise ValueError(
                        f"span text mismatch: [{start}, {end}] is "
                        f"{text[start:end + 1]!r:.40}, label says {entity!r:.40}"
                    )
                spans.add((type_index[label], start, end))
    return text, sorted(spans)


@dataclasses.dataclass
class SkippedRecords:
    """Bad records met while reading with `skip_bad_records=True`."""

    count: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def add(self, error: MalformedRecordError) -> None:
        self.count += 1
        if len(self.problems) < _MAX_REPORTED:
            self.problems.append(str(error))
        logging.warning("skipping bad record %s", error)


def read_cluener_file(
    path: str | os.PathLike,
    *,
    skip_bad_records: bool = False,
    skipped: SkippedRecords | None = None,
    types: Sequence[str] = CLUENER_TYPES,
) -> Iterator[tuple[int, str, list[tuple[int, int, int]]]]:
    """Yields `(line_number, text, spans)` for every record of a CLUENER file.

    Line numbers start at 1. A bad record raises `MalformedRecordError(path, line,
    problem)`, or, with `skip_bad_records`, is skipped and added to `skipped` (which
    must then be given). An empty file is always an error.
    """
    path = os.fspath(path)
    if skip_bad_records and skipped is None:
        raise ValueError("`skipped` must be given when `skip_bad_records` is True")
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise MalformedRecordError(path, 1, "file is empty (no records)")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            text, spans = parse_cluener_line(raw.removesuffix(b"\r"), types=types)
        except ValueError as error:
            bad = MalformedRecordError(path, number, str(error))
            if not skip_bad_records:
                raise bad from None
            skipped.add(bad)
            continue
        yield number, text, spans


def _find_split_file(directory: str, stem: str) -> str:
    for root, _, files in sorted(os.walk(directory)):
        for suffix in (".jsonl", ".json"):
            if stem + suffix in files:
                return os.path.join(root, stem + suffix)
    raise FileNotFoundError(
        f"data.manual_dir={directory}: no {stem}.jsonl or {stem}.json in it. CLUENER needs "
        "the official train and dev files (train.jsonl and dev.jsonl, or train.json and "
        "dev.json from cluener_public.zip): put them there, or point data.manual_dir at "
        "the directory that holds them")


def cluener_files(manual_dir: str | os.PathLike) -> dict[str, str]:
    """`{"train": path, "validation": path}` of the JSON-lines files in `manual_dir`.

    Raises:
      FileNotFoundError: `manual_dir` is not a directory or lacks one of the files.
    """
    directory = os.fspath(manual_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data.manual_dir={directory} is not a directory: pass the "
                                "directory holding CLUENER's train.jsonl and dev.jsonl")
    return {split: _find_split_file(directory, stem) for split, stem in _SPLIT_FILES.items()}


@dataclasses.dataclass(eq=False)
class CluenerConfig(tfds.core.BuilderConfig):
    """`skip_bad_records`: skip and count malformed records instead of failing;
    `fingerprint`: SHA-256 of the manual files' contents ("" for the download)."""

    skip_bad_records: bool = False
    fingerprint: str = ""


def _files_digest(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for split in sorted(files):
        digest.update(split.encode("utf-8") + b"\0")
        with open(files[split], "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def cluener_config(manual_dir: str | os.PathLike | None = None, *,
                   skip_bad_records: bool = False) -> CluenerConfig:
    """The builder config for CLUENER from `manual_dir` (None: the official download).

    With a `manual_dir`, the config's name carries the first 12 hex digits of a SHA-256
    of the train and dev files, so a build is reused only for the same files.

    Raises:
      FileNotFoundError: `manual_dir` lacks the train or dev file (the message says
        which and what to put there).
    """
    base = "skip_bad_records" if skip_bad_records else "strict"
    if manual_dir is None:
        return Cluener.builder_configs[base]
    digest = _files_digest(cluener_files(manual_dir))
    return CluenerConfig(name=f"{base}_{digest[:12]}", skip_bad_records=skip_bad_records,
                         fingerprint=digest,
                         description=f"From the files in {os.fspath(manual_dir)}.")


class Cluener(tfds.core.GeneratorBasedBuilder):
    """CLUENER 2020: sentences with `(type, start, end)` entity spans, end inclusive.

    Features: `text` (UTF-8), `line` (line number in the source file), `span_type`,
    `span_start`, `span_end` (int32 `[num_spans]`). Splits: `train`, `validation`
    (the official `dev` file). Type names are `CLUENER_TYPES` (also
    `info.metadata["types"]`).
    """

    # Set here because TFDS 4.9.10 otherwise infers it with `importlib_resources`, a
    # package it imports but does not require (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {  # noqa: RUF012
        "1.0.0": "Text and spans from the official JSON lines.",
        "1.1.0": "Configs keyed on the manual files; most spans per record in metadata.",
    }
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads this class attribute)
        CluenerConfig(name="strict", description="Malformed records stop the build."),
        CluenerConfig(name="skip_bad_records", skip_bad_records=True,
                      description="Malformed records are skipped and counted."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the official train/dev JSON lines (from {CLUENER_URL}) as train.jsonl and "
        "dev.jsonl (or train.json, dev.json) in the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        ids = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLUENER 2020 fine-grained Chinese NER (10 entity types).",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "line": tfds.features.Scalar(dtype=np.int64),
                "span_type": ids,
                "span_start": ids,
                "span_end": ids,
            }),
            homepage="https://github.com/CLUEbenchmark/CLUENER2020",
            citation="Xu et al. 2020, CLUENER2020: Fine-grained Named Entity Recognition "
                     "Dataset and Benchmark for Chinese, arXiv:2001.04351",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        try:
            directory = os.fspath(dl_manager.manual_dir)
            self._source = "the JSON lines of manual_dir"
        except AssertionError:
            directory = os.fspath(dl_manager.download_and_extract(CLUENER_URL))
            self._source = f"the official download, {CLUENER_URL}"
        files = cluener_files(directory)
        fingerprint = self.builder_config.fingerprint
        if fingerprint and _files_digest(files) != fingerprint:
            raise ValueError(f"the CLUENER files in {directory} are not those this builder "
                             "was made for (changed since, or another data.manual_dir): "
                             "make the builder again")
        self.info.metadata["types"] = list(CLUENER_TYPES)
        self.info.metadata["skipped_records"] = {}
        self.info.metadata["max_spans"] = {}
        return {split: self._generate_examples(path, split) for split, path in files.items()}

    def _log_download_bytes(self) -> None:
        """TFDS would announce a download of unknown size even for local files."""
        print(f"[kexue.data] building cluener into {self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        counts = ", ".join(f"{info.num_examples:,} {name}"
                           for name, info in sorted(self.info.splits.items()))
        print(f"[kexue.data] cluener built from {getattr(self, '_source', 'its files')} "
              f"({counts})", flush=True)

    def _generate_examples(self, path: str, split: str) -> Iterator[tuple[str, dict]]:
        skipped = SkippedRecords()
        name = os.path.basename(path)
        self.info.metadata["max_spans"][split] = 0
        for number, text, spans in read_cluener_file(
                path, skip_bad_records=self.builder_config.skip_bad_records, skipped=skipped):
            self.info.metadata["max_spans"][split] = max(
                self.info.metadata["max_spans"][split], len(spans))
            columns = np.asarray(spans, dtype=np.int32).reshape(-1, 3)
            yield f"{name}:{number}", {
                "text": text, "line": number, "span_type": columns[:, 0],
                "span_start": columns[:, 1], "span_end": columns[:, 2],
            }
        if skipped.count:
            logging.warning("%s: skipped %d bad records", path, skipped.count)
        self.info.metadata["skipped_records"][split] = dataclasses.asdict(skipped)
