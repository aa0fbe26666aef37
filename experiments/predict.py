"""Apply a trained NER or multi-label model to new text, writing CLUENER-format JSON lines.

    python -m experiments.predict --workdir runs/gp --text "彭小军认为，国内银行现在走的是台湾模式"
    python -m experiments.predict --workdir runs/gp --input dev.jsonl --output pred.jsonl
        [--step latest|best|N] [--batch_size 32]

Loads the model of the workdir's checkpoint with `kexue.load` (parameters only, one
device). `--text` may be given several times; `--input` is a JSON-lines file whose
objects have a `"text"` (CLUENER's train/dev/test files: `"label"` is ignored, `"id"`
is kept). One JSON object per text goes to `--output` (default stdout), in input
order:

* NER (`global_pointer_ner`, `bio_tagger`): the CLUENER format, so a file can be
  scored against the gold labels or submitted as is,
  `{"id": ..., "text": ..., "label": {type: {entity: [[start, end], ...]}},
  "scores": {type: {entity: [score, ...]}}}`, character offsets, `end` inclusive,
  `scores` parallel to the spans (GlobalPointer: the span logit, an entity iff > 0;
  BIO tagger: the geometric mean probability of the span's tags).
* multi-label (`multilabel_classifier`): `{"id": ..., "text": ..., "labels": [names
  with score > 0], "scores": {name: score}}`.

Every text is checked before the model runs: an unknown workdir or step, a workdir of
another task, an empty text, a text longer than the training length, or a bad input
line is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments.cli import fail, parse_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of experiments.train.")
_TEXT = flags.DEFINE_multi_string("text", None, "A text to label (may be repeated).")
_INPUT = flags.DEFINE_string("input", None, "JSON lines with a \"text\" field each.")
_OUTPUT = flags.DEFINE_string("output", None, "Where the JSON lines go (default stdout).")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, 'latest' or 'best'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.")
flags.mark_flag_as_required("workdir")

#: The tasks this command applies.
KINDS = ("ner", "multilabel")



def read_inputs(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, each a dict with a string `text`.

    Raises:
      ValueError: "<path>:<line>: <problem>" for the first bad line, or an unreadable file.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--input {path}: {type(error).__name__}: {error}") from error
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: bad JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string \"text\"")
        records.append({"where": f"{path}:{number}", **record})
    if not records:
        raise ValueError(f"--input {path}: no records")
    return records


def token_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`(ids int32 [n], offsets int32 [n, 2])`: token `k` covers `text[start:end]`.

    A tokenizer with `encode_with_offsets` (WordPiece) gives its own; otherwise
    (the character tokenizer) token `k` is character `k`.
    """
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(text)
        return np.asarray(ids, np.int32), np.asarray(offsets, np.int32)
    ids = np.asarray(tokenizer.encode(text), np.int32)
    positions = np.arange(len(ids), dtype=np.int32)
    return ids, np.stack([positions, positions + 1], axis=-1)


def check_text(text: str, trained: Any, where: str) -> None:
    """ValueError naming `where` for an empty text or one longer than the training length."""
    if not text.strip():
        raise ValueError(f"{where}: empty text")
    length = len(token_offsets(trained.tokenizer, text)[0])
    if length > trained.seq_len:
        raise ValueError(f"{where}: the text has {length} tokens, more than the "
                         f"{trained.seq_len} the model was trained on (data.seq_len); "
                         "split it into shorter pieces")


def _batches(texts: Sequence[str], trained: Any, size: int) -> Iterator[dict[str, Any]]:
    """Padded batches `[size, seq_len]` (one shape: the forward pass compiles once)."""
    pad = trained.tokenizer.pad_id
    for first in range(0, len(texts), size):
        chunk = texts[first:first + size]
        tokens = np.full((size, trained.seq_len), pad, np.int32)
        valid = np.zeros((size, trained.seq_len), bool)
        offsets = []
        for row, text in enumerate(chunk):
            ids, spans = token_offsets(trained.tokenizer, text)
            tokens[row, :len(ids)], valid[row, :len(ids)] = ids, True
            offsets.append(spans)
        yield {"tokens": tokens, "valid": valid, "offsets": offsets, "rows": len(chunk)}


def _short(score: float) -> float:
    """Six significant digits: short JSON that keeps the sign of the decision."""
    return float(f"{score:.6g}")


def ner_record(text: str, spans: Sequence[tuple[int, int, int, float]], offsets: np.ndarray,
               type_names: Sequence[str]) -> dict[str, Any]:
    """The CLUENER object of one text from its token spans `(type, start, end, score)`."""
    label: dict[str, dict[str, list[list[int]]]] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    for kind, start, end, score in spans:
        first, last = int(offsets[start][0]), int(offsets[end][1]) - 1
        name, entity = type_names[kind], text[first:last + 1]
        label.setdefault(name, {}).setdefault(entity, []).append([first, last])
        scores.setdefault(name, {}).setdefault(entity, []).append(_short(score))
    return {"text": text, "label": label, "scores": scores}


def predict(trained: Any, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """One output object per text (see the module doc); the texts are already checked."""
    import jax
    from flax import nnx

    from kexue import tasks

    graphdef, state = nnx.split(trained.model)  # parameters as arguments, not constants
    forward = jax.jit(lambda state, tokens, valid: trained.task.predict(
        nnx.merge(graphdef, state), tokens, valid))
    out: list[dict[str, Any]] = []
    names = trained.type_names
    for batch in _batches(texts, trained, batch_size):
        result = forward(state, batch["tokens"], batch["valid"])
        rows = range(batch["rows"])
        texts_here = texts[len(out):len(out) + batch["rows"]]
        if trained.kind == "ner":
            spans = tasks.scored_spans(*result)
            out += [ner_record(texts_here[r], spans[r], batch["offsets"][r], names)
                    for r in rows]
        else:
            scores = np.asarray(result, np.float32)
            out += [{"text": texts_here[r],
                     "labels": [names[c] for c in np.flatnonzero(scores[r] > 0)],
                     "scores": {name: _short(float(scores[r, c]))
                                for c, name in enumerate(names)}} for r in rows]
    return out



def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import kexue

    if (_TEXT.value is None) == (_INPUT.value is None):
        fail("give the texts with --text (repeatable) or --input F.jsonl, not both")
    if _BATCH_SIZE.value < 1:
        fail(f"--batch_size: expected a positive int; got {_BATCH_SIZE.value}")
    try:
        records = (read_inputs(_INPUT.value) if _INPUT.value else
                   [{"where": f"--text #{i + 1}", "text": t} for i, t in enumerate(_TEXT.value)])
        trained = kexue.load(_WORKDIR.value, _STEP.value)
        if trained.kind not in KINDS:
            raise ValueError(f"{_WORKDIR.value} holds a {trained.kind!r} model "
                             f"({trained.spec.name}); experiments.predict applies ner and "
                             "multilabel models (experiments.sample continues language "
                             "models)")
        for record in records:
            check_text(record["text"], trained, record["where"])
    except ValueError as error:
        fail(str(error))
    results = predict(trained, [record["text"] for record in records], _BATCH_SIZE.value)
    lines = []
    for record, result in zip(records, results, strict=True):
        if "id" in record:
            result = {"id": record["id"], **result}
        lines.append(json.dumps(result, ensure_ascii=False))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        print(f"[{len(lines)} predictions of {trained.spec.name}, step {trained.step}, "
              f"written to {_OUTPUT.value}]", file=sys.stderr, flush=True)
    else:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
