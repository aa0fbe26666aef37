"""Grain pipelines from a `DataConfig` to batches of NumPy arrays.

    it = make_dataset(DataConfig(task="lm", seq_len=128), "train")   # this process's share
    it.metadata.vocab_size, it.metadata.num_types
    batch = next(it)                            # dict of NumPy arrays
    state = it.get_state()                      # JSON-serialisable; save it per process
    it.set_state(state)                         # the same next batches as before

Every pipeline reads a TFDS `array_record` source (`kexue.data.sources`), keeps this
process's examples (`examples[process_index::process_count]`, before shuffling, so
processes never share an example), and then, for the training split, shuffles with
`seed` (a fresh permutation every epoch) and repeats forever. Evaluation splits
are read once, in order, and padded so that every process yields the same number of
batches. All randomness derives from `seed`, the process index and the
position in the stream, so a pipeline restored from `get_state` continues exactly.

Batches by `task` (B = `batch_size // process_count`, n = `seq_len`):

* "lm": documents tokenized, each followed by `<eos>`, concatenated and cut into
  windows of n + 1 tokens that overlap by one (window k starts at token k * n). A
  document stored in parts (`text_files` cuts files longer than `data.chunk_bytes`)
  is read part by part in order and gets one `<eos>`, so host memory is bounded by
  `data.prefetch` parts, not by the longest document; the windows are the same as
  from the whole document. Shuffling moves whole documents:
  `tokens` int32 [B, n + 1] (inputs `tokens[:, :-1]`, targets `tokens[:, 1:]`),
  `weights` float32 [B, n] (1 where the target is a real token, 0 on padding).
* "mlm": windows of n tokens (no overlap); BERT masking: each non-special token is
  chosen with probability `mlm_probability`; a chosen token becomes `<mask>` (80%),
  a uniformly random regular token (10%) or stays (10%). `tokens` int32 [B, n] (the
  corrupted input), `labels` int32 [B, n] (the original tokens), `weights` float32
  [B, n] (1 at chosen positions), `valid` bool [B, n] (real tokens). With
  `mlm_max_predictions = P > 0` (training split only; evaluation keeps every chosen
  token), at most P tokens per window are chosen, and `predict_positions` int32
  [B, P] and `predict_weights` float32 [B, P] list them (see `mlm_mask`).
* "ner" and "multilabel" (CLUENER): `tokens` int32 [B, n], `valid` bool [B, n]
  (real tokens), `spans` int32 [B, max_spans, 3]: the distinct gold spans as rows
  `(type, start, end)` of token positions (end inclusive), in ascending order, padded
  with rows of -1 (the span rows of `kexue.ops.spans_to_dense` / `spans_to_flat` and
  of `GlobalPointerNER.loss`); `type_labels` int32 [B, num_types]: 1 where a gold
  span of the type overlaps a token of the (cut) sentence; `offsets` int32
  [B, n, 2]: token i is the characters `text[start:end]` of the sentence, `(0, 0)`
  for `[CLS]`, `[SEP]` and padding (what maps predicted token spans back to
  characters, `token_to_char_spans`);
  `dropped_spans` int32 [B]: the sentence's gold spans left out of `spans`;
  `example_weights` float32 [B]: 0 on padding rows. With tokenizer "char" a token is
  one character; with "wordpiece" the sentence is `[CLS] pieces [SEP]` as in BERT
  fine-tuning, cut to n tokens with the `[SEP]` kept. A gold character span enters
  `spans` only when it is exactly a run of tokens of the (cut) sentence: the span of
  the tokens it overlaps maps back to the same characters (`char_to_token_spans`,
  `token_to_char_spans`). Spans beyond the cut, or starting or ending inside a word
  piece, are dropped and counted in `dropped_spans` (the NER task logs them and
  counts them as misses in evaluation).

A controlled class imbalance for the cluener tasks (training split only): with
`rare_types = "movie,book"` and `type_keep_fraction = r`, only
`round(r · n)` of the n training sentences holding any of those types are kept
(chosen by `seed`, after `max_examples`), so the types become rare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from kexue.data.sources import make_builder, prepare
from kexue.data.text_files import DEFAULT_EXCLUDE
from kexue.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer
from kexue.data.wordpiece import WordPieceTokenizer, char_to_token_spans, token_to_char_spans

__all__ = [
    "DATA_FIELDS",
    "TASKS",
    "TOKENIZERS",
    "DataConfig",
    "DataIterator",
    "DatasetMetadata",
    "make_dataset",
    "make_tokenizer",
    "mlm_mask",
    "ner_example",
    "prediction_list",
    "token_offsets",
]

TASKS = ("lm", "mlm", "ner", "multilabel")
TOKENIZERS = ("byte", "char", "wordpiece")
_STATE_VERSION = 1

@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What `make_dataset` reads; every field has a default and is checked once.

    Attributes:
      name: "text_files", "cluener" or a TFDS catalog name.
      task: "lm" | "mlm" | "ner" | "multilabel".
      data_dir: where built datasets (and char vocabularies) live; None: TFDS's
        default ~/tensorflow_datasets.
      manual_dir: cluener: directory with train/dev JSON lines; None: download.
      pattern: text_files: glob of files; None: the Python stdlib's *.py.
      exclude: text_files: fnmatch patterns on path components.
      eval_fraction: text_files: share of files held out for validation.
      skip_bad_records: cluener: skip and count malformed records.
      text_key: feature holding the text; None: "content" (text_files) or "text".
      tokenizer: "byte" | "char" | "wordpiece" (the cluener tasks only: the BERT
        WordPiece of `vocab_file`, `kexue.data.WordPieceTokenizer`).
      vocab_file: wordpiece: the checkpoint's `vocab.txt`.
      lowercase: wordpiece: lower-case the text first (the Chinese BERT / RoFormer
        releases are uncased).
      char_min_count: char tokenizer: minimum count in the training split.
      seq_len: tokens per example (lm windows hold seq_len + 1).
      batch_size: global batch size, split evenly over processes.
      seed: shuffling and masking seed, in [0, 2**32).
      shuffle: shuffle the training split.
      train_split: TFDS split read for split="train".
      eval_split: TFDS split read for split="eval".
      max_examples: use only the first k examples of the training split (0: all); the
        evaluation split is never trimmed by it, so a small training subset is scored
        on the whole dev set (shorten an evaluation with `eval_batches`).
      rare_types: cluener train split: comma-separated entity types made rare by
        `type_keep_fraction` (empty: off).
      type_keep_fraction: cluener train split: share of the sentences holding any of
        `rare_types` that is kept (chosen by `seed`).
      eval_batches: eval: batches per process (0: one full pass).
      mlm_probability: mlm: share of tokens chosen.
      mlm_mask_fraction: mlm: chosen tokens replaced by <mask>.
      mlm_random_fraction: mlm: chosen tokens replaced by a random token.
      mlm_max_predictions: mlm train split: at most this many chosen tokens per window,
        also listed as predict_positions (0: no cap).
      max_spans: ner: rows of `spans` per example.
      num_threads: Grain reader threads per process (0: read in the caller).
      prefetch: Grain prefetch buffer (elements).
      download: build (or download) the dataset when it is missing.
      rebuild: build the dataset again even if a prepared copy of the same sources
        exists (once per command).
      chunk_bytes: text_files: files longer than this are stored in parts of at most
        this many bytes (bounds host memory per element).
    """

    name: str = "text_files"
    task: str = "lm"
    data_dir: str | None = None
    manual_dir: str | None = None
    pattern: str | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    eval_fraction: float = 0.05
    skip_bad_records: bool = False
    text_key: str | None = None
    tokenizer: str = "byte"
    vocab_file: str | None = None
    lowercase: bool = True
    char_min_count: int = 1
    seq_len: int = 256
    batch_size: int = 32
    seed: int = 0
    shuffle: bool = True
    train_split: str = "train"
    eval_split: str = "validation"
    max_examples: int = 0
    rare_types: str = ""
    type_keep_fraction: float = 1.0
    eval_batches: int = 0
    mlm_probability: float = 0.15
    mlm_mask_fraction: float = 0.8
    mlm_random_fraction: float = 0.1
    mlm_max_predictions: int = 0
    max_spans: int = 32
    num_threads: int = 2
    prefetch: int = 16
    download: bool = True
    rebuild: bool = False
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        problems = _problems(self)
        if problems:
            raise ValueError(problems[0])

    @classmethod
    def from_settings(cls, settings: Any) -> DataConfig:
        """From a `DataConfig`, or a mapping (anything with `items()`) of its fields;
        missing fields take their defaults.

        Raises:
          ValueError: an unknown field (naming it and the known ones) or a bad value.
        """
        if isinstance(settings, DataConfig):
            return settings
        given = dict(settings.items())
        unknown = sorted(set(given) - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"`{unknown[0]}`: not a data field (unknown: {unknown}); "
                             f"known: {sorted(DATA_FIELDS)}")
        return cls(**given)


#: The fields of `DataConfig`, in order.
DATA_FIELDS = tuple(field.name for field in dataclasses.fields(DataConfig))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _problems(s: DataConfig) -> list[str]:
    """One line per bad field of `s`, each "`field`: expected …; got …"."""
    problems = []
    if s.task not in TASKS:
        problems.append(f"`task`: expected one of {list(TASKS)}; got {s.task!r}")
    if s.tokenizer not in TOKENIZERS:
        problems.append(f"`tokenizer`: expected one of {list(TOKENIZERS)}; "
                        f"got {s.tokenizer!r}")
    if s.task in ("ner", "multilabel") and (s.tokenizer not in ("char", "wordpiece")
                                            or s.name != "cluener"):
        problems.append(f"`task`: {s.task!r} needs name='cluener' and tokenizer 'char' or "
                        f"'wordpiece'; got name={s.name!r}, tokenizer={s.tokenizer!r}")
    if s.tokenizer == "wordpiece":
        if s.task not in ("ner", "multilabel"):
            problems.append(f"`tokenizer`: 'wordpiece' is for the tasks 'ner' and "
                            f"'multilabel'; got task={s.task!r}")
        if not isinstance(s.vocab_file, str) or not s.vocab_file:
            problems.append(f"`vocab_file`: tokenizer 'wordpiece' needs the path of a BERT "
                            f"vocab.txt; got {s.vocab_file!r}")
        if isinstance(s.seq_len, int) and s.seq_len < 3:
            problems.append(f"`seq_len`: tokenizer 'wordpiece' needs at least 3 ([CLS], a "
                            f"piece, [SEP]); got {s.seq_len!r}")
    for key in ("seq_len", "batch_size", "char_min_count", "max_spans", "chunk_bytes"):
        if not _is_int(getattr(s, key)) or getattr(s, key) < 1:
            problems.append(f"`{key}`: expected a positive int; got {getattr(s, key)!r}")
    for key in ("max_examples", "eval_batches", "num_threads", "prefetch",
                "mlm_max_predictions"):
        if not _is_int(getattr(s, key)) or getattr(s, key) < 0:
            problems.append(f"`{key}`: expected a non-negative int; got {getattr(s, key)!r}")
    problems += _imbalance_problems(s)
    if not _is_int(s.seed) or not 0 <= s.seed < 2**32:
        problems.append(f"`seed`: expected an int in [0, 2**32); got {s.seed!r}")
    for key in ("eval_fraction", "type_keep_fraction", "mlm_probability", "mlm_mask_fraction",
                "mlm_random_fraction"):
        value = getattr(s, key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            problems.append(f"`{key}`: expected a finite number; got {value!r}")
    if _is_int(s.chunk_bytes) and s.chunk_bytes < 16:
        problems.append(f"`chunk_bytes`: expected at least 16; got {s.chunk_bytes}")
    if not 0.0 < s.mlm_probability <= 1.0:
        problems.append(f"`mlm_probability`: expected a number in (0, 1]; "
                        f"got {s.mlm_probability!r}")
    if not (0.0 <= s.mlm_mask_fraction and 0.0 <= s.mlm_random_fraction
            and s.mlm_mask_fraction + s.mlm_random_fraction <= 1.0):
        problems.append(f"`mlm_mask_fraction`: expected it and `mlm_random_fraction` >= 0 "
                        f"with a sum <= 1; got {s.mlm_mask_fraction!r} and "
                        f"{s.mlm_random_fraction!r}")
    if not 0.0 <= s.eval_fraction < 1.0:
        problems.append(f"`eval_fraction`: expected a number in [0, 1); "
                        f"got {s.eval_fraction!r}")
    return problems


def _rare_type_names(rare_types: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in rare_types.split(",") if name.strip())


def _imbalance_problems(s: DataConfig) -> list[str]:
    """Checks `rare_types` and `type_keep_fraction` (see `_imbalanced_indices`)."""
    fraction, rare = s.type_keep_fraction, s.rare_types
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
            0.0 <= fraction <= 1.0):
        return [f"`type_keep_fraction`: expected a number in [0, 1]; got {fraction!r}"]
    if not isinstance(rare, str):
        return [f"`rare_types`: expected a comma-separated string of entity types "
                f"(e.g. 'movie,book'); got {rare!r}"]
    names = _rare_type_names(rare)
    problems = []
    if fraction < 1.0 and not names:
        problems.append(f"`rare_types`: `type_keep_fraction` = {fraction} < 1 needs the "
                        "entity types to make rare; got none")
    if names:
        if s.name != "cluener" or s.task not in ("ner", "multilabel"):
            problems.append(f"`rare_types`: needs name='cluener' and task 'ner' or "
                            f"'multilabel'; got name={s.name!r}, task={s.task!r}")
        from kexue.data.cluener import CLUENER_TYPES

        unknown = [name for name in names if name not in CLUENER_TYPES]
        if unknown:
            problems.append(f"`rare_types`: expected entity types among "
                            f"{', '.join(CLUENER_TYPES)}; got unknown {unknown}")
        if len(set(names)) != len(names):
            problems.append(f"`rare_types`: expected each type once; got {rare!r}")
    return problems


def _imbalanced_indices(source: Any, count: int, s: DataConfig,
                        type_names: Sequence[str]) -> list[int]:
    """Indices of the first `count` examples with most sentences of `rare_types` dropped.

    Of the `n` sentences holding at least one span of a type in `rare_types`,
    exactly `round(type_keep_fraction · n)` (halves rounded up) are kept, chosen
    without replacement by `numpy.random.default_rng([seed, 0x7A7E])`; every other
    sentence is kept, in the source's order: the result depends on `seed` only.
    """
    wanted = {type_names.index(name) for name in _rare_type_names(s.rare_types)}
    holding = [i for i in range(count)
               if wanted.intersection(np.asarray(source[i]["span_type"]).tolist())]
    keep = math.floor(s.type_keep_fraction * len(holding) + 0.5)
    rng = np.random.default_rng([s.seed, 0x7A7E])
    dropped = set(holding) - {holding[j] for j in rng.choice(len(holding), size=keep,
                                                             replace=False)}
    return [i for i in range(count) if i not in dropped]


class _Subset:
    """The examples of a random-access source at `indices` (a source itself)."""

    def __init__(self, source: Any, indices: Sequence[int]) -> None:
        self._source, self._indices = source, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Any:
        return self._source[self._indices[index]]


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """What a model and a trainer need to know about the batches."""

    name: str
    task: str
    split: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    num_types: int
    type_names: tuple[str, ...]
    seq_len: int
    global_batch_size: int
    local_batch_size: int
    process_index: int
    process_count: int
    num_examples: int
    num_batches: int | None
    skipped_records: int


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", errors="replace")


def _split_texts(source: Any, key: str) -> Iterator[str]:
    chunk = 32  # records in memory at once (text_files parts are up to chunk_bytes each)
    for start in range(0, len(source), chunk):
        for example in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
            yield _text(example[key])


def make_tokenizer(
    kind: str, *, builder: Any = None, train_source: Any = None, text_key: str = "text",
    min_count: int = 1, tag: str = "train", vocab_file: str | None = None,
    lowercase: bool = True,
) -> Tokenizer:
    """"byte" -> `ByteTokenizer()`; "char" -> the vocabulary of `train_source`;
    "wordpiece" -> `WordPieceTokenizer(vocab_file, lowercase=lowercase)`.

    The char vocabulary is saved as JSON in `builder.data_dir` (next to the data) as
    `char_vocab.<tag>.<text_key>.min<min_count>.json` and reloaded on later calls.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "wordpiece":
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(f"`vocab_file`: expected a BERT vocab.txt file; got {vocab_file!r}"
                             + ("" if vocab_file is None else " (not a file)"))
        return WordPieceTokenizer(vocab_file, lowercase=lowercase)
    if kind != "char":
        raise ValueError(f"tokenizer must be one of {list(TOKENIZERS)}, got {kind!r}")
    safe_tag = re.sub(r"[^\w.-]+", "_", tag)
    path = os.path.join(os.fspath(builder.data_dir),
                        f"char_vocab.{safe_tag}.{text_key}.min{min_count}.json")
    if os.path.exists(path):
        return CharTokenizer.load(path)
    tokenizer = CharTokenizer.build(_split_texts(train_source, text_key), min_count=min_count)
    tokenizer.save(path)
    return tokenizer


# ----------------------------------------------------------------------------- LM windows


def _document_units(source: Any) -> list[list[int]]:
    """Per document, the indices of its records in part order; documents ordered by the
    index of their part 0 (whose key, the file's path, puts the documents in the order
    they have when stored whole). Reads every record's `path` and `part` once."""
    parts: dict[bytes, list[tuple[int, int]]] = {}
    chunk = 32  # records in memory at once
    for start in range(0, len(source), chunk):
        indices = list(range(start, min(start + chunk, len(source))))
        for index, example in zip(indices, source.__getitems__(indices), strict=True):
            parts.setdefault(bytes(example["path"]), []).append((int(example["part"]), index))
    units = [[index for _, index in sorted(entries)] for entries in parts.values()]
    return sorted(units, key=lambda unit: unit[0])


class _DocumentParts(grain.MapDataset):
    """The records of the documents of `parent` (a dataset of record-index lists, maybe
    shuffled and repeated), part after part: element p is a record of `source`.

    Every epoch of `parent` (`documents` documents, in the order it gives them) covers
    `parts` positions; an epoch's offsets are computed when first needed (two are kept).
    """

    def __init__(self, parent: grain.MapDataset, source: Any, *, documents: int, parts: int,
                 finite: bool):
        super().__init__(parent)
        self._source = source
        self._documents = documents
        self._parts = parts
        self._finite = finite
        self._lock = threading.Lock()
        self._epochs: dict[int, tuple[list[list[int]], np.ndarray]] = {}

    def __len__(self) -> int:
        return self._parts if self._finite else sys.maxsize

    def __str__(self) -> str:
        return f"DocumentParts(parts={self._parts})"

    def _epoch(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        with self._lock:
            if epoch not in self._epochs:
                count = self._documents
                documents = [self._parent[epoch * count + k] for k in range(count)]
                ends = np.cumsum([len(document) for document in documents])
                self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
                self._epochs[epoch] = (documents, ends)
            return self._epochs[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._parts)
        documents, ends = self._epoch(epoch)
        k = int(np.searchsorted(ends, position, side="right"))
        part = position - (int(ends[k - 1]) if k else 0)
        return self._source[documents[k][part]]


class _TokenWindows(grain.IterDataset):
    """Cuts a stream of 1-D token arrays into windows of `length`, `stride` apart."""

    def __init__(self, parent: grain.IterDataset, *, length: int, stride: int, pad_id: int,
                 finite: bool) -> None:
        super().__init__(parent)
        self._args = dict(length=length, stride=stride, pad_id=pad_id, finite=finite)

    def __iter__(self) -> _TokenWindowsIterator:
        return _TokenWindowsIterator(self._parent.__iter__(), **self._args)

    def __str__(self) -> str:
        return f"TokenWindows({self._args})"


class _TokenWindowsIterator(grain.DatasetIterator):
    """State: the parent's state before the document holding the next window's first
    token, and that token's offset in the document (enough to resume exactly)."""

    def __init__(self, parent: grain.DatasetIterator, *, length: int, stride: int,
                 pad_id: int, finite: bool) -> None:
        super().__init__(parent)
        self._length, self._stride, self._pad_id, self._finite = length, stride, pad_id, finite
        self._docs: deque[tuple[dict, np.ndarray]] = deque()  # (parent state before, tokens)
        self._offset = 0
        self._exhausted = False

    def _available(self) -> int:
        return sum(len(tokens) for _, tokens in self._docs) - self._offset

    def __next__(self) -> dict[str, np.ndarray]:
        while self._available() < self._length and not self._exhausted:
            state = self._parent.get_state()
            try:
                tokens = next(self._parent)["tokens"]
            except StopIteration:
                if not self._finite:
                    raise
                self._exhausted = True
                break
            self._docs.append((state, np.asarray(tokens, dtype=np.int32)))
        available = self._available()
        if available < self._length and available <= self._length - self._stride:
            raise StopIteration  # nothing new left (only the overlap, or nothing)
        pieces, needed, offset = [], self._length, self._offset
        for _, tokens in self._docs:
            piece = tokens[offset:offset + needed]
            pieces.append(piece)
            needed -= len(piece)
            offset = 0
            if needed == 0:
                break
        window = np.full(self._length, self._pad_id, dtype=np.int32)
        real = self._length - needed
        window[:real] = np.concatenate(pieces) if pieces else []
        self._advance(min(self._stride, available))
        return {"tokens": window, "valid": np.arange(self._length) < real}

    def _advance(self, count: int) -> None:
        self._offset += count
        while self._docs and self._offset >= len(self._docs[0][1]):
            self._offset -= len(self._docs[0][1])
            self._docs.popleft()
        if not self._docs:
            self._offset = 0

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            return {"parent": self._docs[0][0], "offset": self._offset}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._offset = int(state["offset"])
        self._exhausted = False


# ----------------------------------------------------------------------------- examples


def mlm_mask(
    tokens: np.ndarray, valid: np.ndarray, rng: np.random.Generator, *, tokenizer: Tokenizer,
    probability: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
    max_predictions: int = 0,
) -> dict[str, np.ndarray]:
    """BERT masking of int `tokens` [..., n] where `valid` (bool, same shape).

    Only regular tokens (not `<pad>`, `<bos>`, `<eos>`, ...) are chosen, each with
    `probability`; of the chosen, `mask_fraction` become `<mask>`, `random_fraction` a
    uniform random regular token, the rest stay.

    With `max_predictions = P > 0`, at most P tokens per window are chosen (when more
    are drawn, a uniformly random P of them are kept and the others are left as they
    were, as BERT's `max_predictions_per_seq`), and the chosen positions are also
    returned as a list, so that the masked-LM head can run at those P positions only
    (`RoFormerMLM(..., predict_positions=...)`) instead of at all n.

    Returns:
      `tokens` (corrupted, int32), `labels` (the input tokens, int32), `weights`
      (float32, 1 at chosen positions), `valid` (bool, the input); with `max_predictions`
      also `predict_positions` (int32 [..., P]: the chosen positions, ascending, then
      0 as padding) and `predict_weights` (float32 [..., P]: 1 on real entries).
    """
    if isinstance(max_predictions, bool) or not isinstance(max_predictions, int | np.integer) \
            or max_predictions < 0:
        raise ValueError(f"max_predictions must be a non-negative int, got {max_predictions!r}")
    tokens = np.asarray(tokens, dtype=np.int32)
    low, high = tokenizer.regular_ids
    regular = valid & (tokens >= low) & (tokens < high)
    chosen = regular & (rng.random(tokens.shape) < probability)
    action = rng.random(tokens.shape)
    if max_predictions:
        # Keep a uniformly random `max_predictions` of the chosen: rank them by a key.
        keys = np.where(chosen, rng.random(tokens.shape), np.inf)
        ranks = np.argsort(np.argsort(keys, axis=-1, kind="stable"), axis=-1, kind="stable")
        chosen &= ranks < max_predictions
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    corrupted = np.where(to_mask, tokenizer.mask_id, tokens)
    corrupted = np.where(to_random, rng.integers(low, high, tokens.shape), corrupted)
    out = {"tokens": corrupted.astype(np.int32), "labels": tokens,
           "weights": chosen.astype(np.float32), "valid": np.asarray(valid, dtype=bool)}
    if max_predictions:
        out.update(prediction_list(chosen, max_predictions))
    return out


def prediction_list(chosen: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The True positions of bool `chosen` [..., n] as a fixed-size list per row.

    Returns `predict_positions` (int32 [..., size]: the chosen positions in ascending
    order, then 0 as padding) and `predict_weights` (float32 [..., size]: 1 on real
    entries). Rows with more than `size` chosen positions keep the first `size`.
    """
    chosen = np.asarray(chosen, dtype=bool)
    n = chosen.shape[-1]
    # Chosen positions first, in ascending order (a stable sort of "not chosen").
    order = np.argsort(~chosen, axis=-1, kind="stable")[..., :size]
    real = np.take_along_axis(chosen, order, axis=-1)
    if size > n:  # fewer positions than slots: pad the list
        pad = [(0, 0)] * (chosen.ndim - 1) + [(0, size - n)]
        order, real = np.pad(order, pad), np.pad(real, pad)
    return {"predict_positions": np.where(real, order, 0).astype(np.int32),
            "predict_weights": real.astype(np.float32)}


def token_offsets(tokenizer: Tokenizer, text: str, seq_len: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """`(ids int32 [m], offsets int32 [m, 2])` of `text` cut to `m <= seq_len` tokens.

    A `WordPieceTokenizer` gives `[CLS] pieces [SEP]` (a longer sentence keeps its
    first `seq_len - 2` pieces and the `[SEP]`; `[CLS]` / `[SEP]` cover `(0, 0)`);
    any other tokenizer one token per character, token i covering `(i, i + 1)`.
    """
    if isinstance(tokenizer, WordPieceTokenizer):
        ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=True)
        if len(ids) > seq_len:
            ids = np.concatenate([ids[:seq_len - 1], ids[-1:]])
            offsets = np.concatenate([offsets[:seq_len - 1], offsets[-1:]])
        return ids, offsets
    ids = np.asarray(tokenizer.encode(text)[:seq_len], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)
    return ids, np.stack([positions, positions + 1], axis=-1)


def ner_example(
    text: str, span_type: np.ndarray, span_start: np.ndarray, span_end: np.ndarray, *,
    tokenizer: Tokenizer, seq_len: int, num_types: int, max_spans: int,
) -> dict[str, np.ndarray]:
    """One NER example (see the module doc for the fields and the span rule).

    Args:
      text: the sentence.
      span_type, span_start, span_end: int `[P]`, the gold character spans (end
        inclusive).
      tokenizer: a `CharTokenizer` (one token per character) or a `WordPieceTokenizer`
        (`token_offsets`).

    Raises:
      ValueError: more than `max_spans` spans remain after truncation.
    """
    ids, offsets = token_offsets(tokenizer, text, seq_len)
    length = len(ids)
    tokens = np.full(seq_len, tokenizer.pad_id, dtype=np.int32)
    tokens[:length] = ids
    gold = np.unique(np.stack([np.asarray(a, dtype=np.int64).reshape(-1)
                               for a in (span_type, span_start, span_end)], axis=-1), axis=0)
    token_spans = char_to_token_spans(offsets, gold)
    exact = (token_spans >= 0).all(axis=1) & (
        token_to_char_spans(offsets, token_spans) == gold).all(axis=1)
    rows = token_spans[exact]
    if len(rows) > max_spans:
        raise ValueError(f"an example of {text[:30]!r}... has {len(rows)} spans, more than "
                         f"data.max_spans={max_spans}; raise data.max_spans")
    spans = np.full((max_spans, 3), -1, dtype=np.int32)
    spans[:len(rows)] = rows[np.lexsort(rows.T[::-1])] if len(rows) else rows
    type_labels = np.zeros(num_types, dtype=np.int32)
    type_labels[token_spans[(token_spans >= 0).all(axis=1), 0]] = 1
    padded_offsets = np.zeros((seq_len, 2), dtype=np.int32)
    padded_offsets[:length] = offsets
    return {"tokens": tokens, "valid": np.arange(seq_len) < length, "spans": spans,
            "type_labels": type_labels, "offsets": padded_offsets,
            "dropped_spans": np.int32(len(gold) - len(rows)),
            "example_weights": np.float32(1.0)}


def _check_span_capacity(source: Any, count: int, s: DataConfig, split: str,
                         most_in_split: int | None) -> None:
    """Fails before training if an example has more spans than `data.max_spans` once
    cut to `data.seq_len` characters (skipped when the build recorded a maximum that
    fits: `most_in_split`, the most spans of any record)."""
    if most_in_split is not None and most_in_split <= s.max_spans:
        return
    worst, first = 0, None
    for start in range(0, count, 256):
        for example in source.__getitems__(list(range(start, min(start + 256, count)))):
            end = np.asarray(example["span_end"], np.int64)
            length = min(len(_text(example["text"])), s.seq_len)
            keep = end < length
            spans = len(set(zip(np.asarray(example["span_type"])[keep].tolist(),
                                np.asarray(example["span_start"])[keep].tolist(),
                                end[keep].tolist(), strict=True)))
            if spans > s.max_spans and first is None:
                first = (int(example["line"]), spans)
            worst = max(worst, spans)
    if first is not None:
        raise ValueError(
            f"{s.name}/{split}: the record on line {first[0]} of its source file has "
            f"{first[1]} entity spans within the first data.seq_len={s.seq_len} characters, "
            f"more than data.max_spans={s.max_spans}: set --config.data.max_spans={worst} "
            "(the most in this split) or more")


def _padding_row(example: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    fill = {"tokens": pad_id, "spans": -1}
    return {key: np.full_like(value, fill.get(key, 0)) for key, value in example.items()}


# ----------------------------------------------------------------------------- iterator


def _plain(value: Any) -> Any:
    """NumPy scalars and tuples -> JSON types (so a state survives `json.dumps`)."""
    return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item")
                                 else list(x)))


class DataIterator:
    """Batches of one split for this process; checkpointable with `get_state`.

    Attributes:
      metadata: `DatasetMetadata`.
      tokenizer: the tokenizer that produced the ids.
    """

    def __init__(self, batches: grain.IterDataset, *, metadata: DatasetMetadata,
                 tokenizer: Tokenizer, finish: Callable[[dict, int], dict],
                 padding_row: dict[str, np.ndarray]) -> None:
        self.metadata = metadata
        self.tokenizer = tokenizer
        self._batches = batches
        self._iterator = iter(batches)
        self._finish = finish
        self._padding_row = padding_row
        self._step = 0

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        total = self.metadata.num_batches
        if total is not None and self._step >= total:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            if total is None:
                raise
            batch = None
        size = self.metadata.local_batch_size
        rows = 0 if batch is None else len(next(iter(batch.values())))
        if rows < size:  # the end of an evaluation pass: pad with empty rows
            padding = {key: np.stack([value] * (size - rows))
                       for key, value in self._padding_row.items()}
            batch = padding if batch is None else {
                key: np.concatenate([batch[key], padding[key]]) for key in batch}
        out = self._finish(batch, self._step)
        self._step += 1
        return out

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream (restore with `set_state`)."""
        m = self.metadata
        return _plain({"version": _STATE_VERSION, "name": m.name, "split": m.split,
                       "process_index": m.process_index, "process_count": m.process_count,
                       "step": self._step, "pipeline": self._iterator.get_state()})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a state of an iterator built from the same config and split."""
        m = self.metadata
        expected = {"version": _STATE_VERSION, "name": m.name, "split": m.split,
                    "process_index": m.process_index, "process_count": m.process_count}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"iterator state is for {found}, this iterator is {expected}")
        self._iterator.set_state(state["pipeline"])
        self._step = int(state["step"])


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return process_index, process_count


def make_dataset(
    config: DataConfig | Mapping[str, Any],
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    seq_len: int | None = None,
) -> DataIterator:
    """Batches of `config` for this process (see the module doc for their fields).

    Args:
      config: a `DataConfig`, or a mapping of its fields (missing fields take their
        defaults, unknown ones are errors).
      split: "train" (`train_split`, shuffled, repeated forever) or "eval"
        (`eval_split`, one ordered pass, or `eval_batches` batches).
      process_index, process_count: this process's place among the data-loading
        processes; default `jax.process_index()` and `jax.process_count()`.
      seq_len: overrides `config.seq_len` (e.g. evaluating at longer lengths).

    Returns:
      A `DataIterator`; `metadata.local_batch_size` rows per batch.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    s = DataConfig.from_settings(config)
    if seq_len is not None:
        s = dataclasses.replace(s, seq_len=seq_len)
    process_index, process_count = _process_info(process_index, process_count)
    if s.batch_size % process_count:
        raise ValueError(f"batch_size {s.batch_size} is not divisible by "
                         f"process_count {process_count}")
    local_batch = s.batch_size // process_count
    training = split == "train"
    split_name = s.train_split if training else s.eval_split

    builder = make_builder(s.name, s.data_dir, pattern=s.pattern, exclude=s.exclude,
                           eval_fraction=s.eval_fraction, skip_bad_records=s.skip_bad_records,
                           manual_dir=s.manual_dir, chunk_bytes=s.chunk_bytes)
    prepare(builder, manual_dir=s.manual_dir, download=s.download, rebuild=s.rebuild)
    _check_split(builder, s, split_name, training)
    source = builder.as_data_source(split=split_name)
    text_key = s.text_key or ("content" if s.name == "text_files" else "text")
    tokenizer = make_tokenizer(
        s.tokenizer, builder=builder, train_source=builder.as_data_source(split=s.train_split)
        if s.tokenizer == "char" else None, text_key=text_key, min_count=s.char_min_count,
        tag=s.train_split, vocab_file=s.vocab_file, lowercase=s.lowercase)
    metadata_dict = builder.info.metadata or {}
    skipped = metadata_dict.get("skipped_records", {}).get(split_name.split("[")[0], {})
    skipped = int(skipped.get("count", 0))
    if skipped:
        logging.warning("%s/%s: %d bad records were skipped when building", s.name,
                        split_name, skipped)
    type_names = tuple(metadata_dict.get("types", ()))

    if training and _rare_type_names(s.rare_types):
        # rare_types / type_keep_fraction: a controlled class imbalance, applied after
        # max_examples and before the process split.
        source = _Subset(source, _imbalanced_indices(
            source, _split_size(source, s.max_examples), s, type_names))
    limit = s.max_examples if training else 0  # max_examples trims the training split only
    units = None
    if s.task in ("lm", "mlm") and metadata_dict.get("multipart_documents", {}).get(
            split_name.split("[")[0]):
        units = _document_units(source)[:limit or None]
        units = units[process_index::process_count]
        examples = grain.MapDataset.source(units)
    else:
        examples = grain.MapDataset.source(source)
        if limit:
            examples = examples[:limit]
        examples = examples[process_index::process_count]
    if s.task in ("ner", "multilabel"):
        _check_span_capacity(source, _split_size(source, limit), s, split_name,
                             metadata_dict.get("max_spans", {}).get(split_name.split("[")[0]))
    num_examples = len(examples)
    if num_examples == 0:
        raise ValueError(f"process {process_index} of {process_count} has no examples of "
                         f"{s.name}/{split_name}")
    if training:
        if s.shuffle:
            examples = examples.shuffle(seed=s.seed)
        examples = examples.repeat()
    read = grain.ReadOptions(num_threads=s.num_threads, prefetch_buffer_size=s.prefetch)

    if s.task in ("lm", "mlm"):
        eos = tokenizer.eos_id

        def tokenize(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
            ids = tokenizer.encode(example[text_key])
            if int(example.get("part", 0)) + 1 < int(example.get("parts", 1)):
                return {"tokens": ids}  # not the document's last part: no <eos> yet
            return {"tokens": np.concatenate([ids, np.array([eos], np.int32)])}

        if units is not None:
            examples = _DocumentParts(examples, source, documents=len(units),
                                      parts=sum(map(len, units)), finite=not training)
        length = s.seq_len + 1 if s.task == "lm" else s.seq_len
        windows = _TokenWindows(examples.map(tokenize).to_iter_dataset(read), length=length,
                                stride=s.seq_len, pad_id=tokenizer.pad_id, finite=not training)
        batches = windows.batch(local_batch, drop_remainder=training)
        padding_row = {"tokens": np.full(length, tokenizer.pad_id, np.int32),
                       "valid": np.zeros(length, bool)}
        if not training and not s.eval_batches and process_count > 1:
            raise ValueError("an lm/mlm evaluation pass over several processes needs "
                             "eval_batches > 0 (processes must agree on the count)")
        num_batches = (s.eval_batches or None) if not training else None
        num_types = 0
        stream = 1 if training else 2
        if s.task == "lm":
            def finish(batch: dict, step: int) -> dict:
                del step
                return {"tokens": batch["tokens"],
                        "weights": batch["valid"][:, 1:].astype(np.float32)}
        else:
            def finish(batch: dict, step: int) -> dict:
                rng = np.random.default_rng([s.seed, process_index, stream, step])
                return mlm_mask(batch["tokens"], batch["valid"], rng, tokenizer=tokenizer,
                                probability=s.mlm_probability,
                                mask_fraction=s.mlm_mask_fraction,
                                random_fraction=s.mlm_random_fraction,
                                max_predictions=s.mlm_max_predictions if training else 0)
    else:
        num_types = len(type_names)

        def to_example(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
            return ner_example(_text(example["text"]), example["span_type"],
                               example["span_start"], example["span_end"],
                               tokenizer=tokenizer, seq_len=s.seq_len, num_types=num_types,
                               max_spans=s.max_spans)

        batches = examples.map(to_example).to_iter_dataset(read).batch(
            local_batch, drop_remainder=training)
        padding_row = _padding_row(to_example({"text": "", "span_type": [], "span_start": [],
                                               "span_end": []}), tokenizer.pad_id)
        if training:
            num_batches = None
        else:
            largest_shard = math.ceil(len(source) / process_count)
            num_batches = s.eval_batches or math.ceil(largest_shard / local_batch)

        def finish(batch: dict, step: int) -> dict:
            del step
            return batch

    metadata = DatasetMetadata(
        name=s.name, task=s.task, split=split_name, vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        mask_id=tokenizer.mask_id, num_types=num_types, type_names=type_names,
        seq_len=s.seq_len, global_batch_size=s.batch_size, local_batch_size=local_batch,
        process_index=process_index, process_count=process_count, num_examples=num_examples,
        num_batches=num_batches, skipped_records=skipped)
    return DataIterator(batches, metadata=metadata, tokenizer=tokenizer, finish=finish,
                        padding_row=padding_row)


def _check_split(builder: Any, s: DataConfig, split_name: str, training: bool) -> None:
    """ValueError saying what to change when the split to read does not exist."""
    available = sorted(builder.info.splits.keys())
    if split_name.split("[")[0] in available:
        return
    if s.name == "text_files" and not training:
        raise ValueError(
            f"`eval_fraction`: the held-out split ({split_name!r}) of "
            f"{builder.builder_config.pattern!r} is empty with eval_fraction="
            f"{s.eval_fraction}: raise eval_fraction (the share of files held out; of a "
            "single file, the share of its bytes) or match more (non-empty) files with "
            "`pattern`")
    key = "train_split" if training else "eval_split"
    raise ValueError(f"`{key}`: {s.name} has no split {split_name!r}; it has {available}")


def _split_size(source: Any, max_examples: int) -> int:
    return min(len(source), max_examples) if max_examples else len(source)
