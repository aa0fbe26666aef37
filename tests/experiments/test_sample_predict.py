"""`experiments.sample` and `experiments.predict` on in-process smoke runs, as a user runs them.

The sample's text is checked against a greedy decoding by the full forward pass (no
cache) and against the same seed drawn in this process; predictions are parsed back
with CLUENER's own line parser and scored with `kexue.ops.span_f1` against the gold.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import kexue
from experiments import predict as predict_cli
from experiments.run import prompt_ids, stream_text
from kexue import data, ops
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER
from tests.experiments._runs import run_cli, train, train_lm, write_corpus

needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sample")
    workdir = tmp / "run"
    train_lm(workdir, tmp / "tfds", write_corpus(tmp / "corpus"))
    return workdir


def jitted(model):
    """`model(tokens, **kw)` as one jitted function (a new program per input shape);
    eager calls dispatch op by op, about 5x slower for these small models."""
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, tokens, kw: nnx.merge(graphdef, state)(tokens, **kw))
    return lambda tokens, **kw: call(state, tokens, kw)


def greedy_by_full_forward(trained, prompt: str, steps: int) -> str:
    """Argmax continuation recomputing the whole sequence each step (no KV cache)."""
    ids = prompt_ids(trained.tokenizer, prompt)
    forward = jitted(trained.model)
    new = []
    for _ in range(steps):
        token = int(np.argmax(np.asarray(forward(ids))[0, -1]))
        if token == trained.tokenizer.eos_id:
            break
        new.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
    return trained.tokenizer.decode(new)


def test_greedy_sample_is_the_full_forward_argmax(lm_workdir):
    result = run_cli("experiments.sample", "--workdir", str(lm_workdir), "--prompt", "def ",
                     "--temperature", "0", "--max_new_tokens", "24")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "def " + greedy_by_full_forward(kexue.load(lm_workdir), "def ", 24)
    assert result.stdout == expected + "\n"
    assert "step 2; greedy" in result.stderr


def test_the_same_seed_gives_the_same_text(lm_workdir):
    settings = dict(temperature=1.2, top_k=100, top_p=0.95)
    result = run_cli("experiments.sample", "--workdir", str(lm_workdir), "--prompt", "x",
                     "--max_new_tokens", "30", "--seed", "7", "--num_samples", "2",
                     *(f"--{name}={value}" for name, value in settings.items()))
    assert result.returncode == 0, result.stderr[-3000:]
    trained = kexue.load(lm_workdir)

    def drawn(seed: int, index: int) -> str:
        key = jax.random.fold_in(jax.random.key(seed), index)
        return "x" + "".join(stream_text(trained.model, trained.tokenizer, "x",
                                         max_new_tokens=30, rng=key, **settings))

    first, second = drawn(7, 0), drawn(7, 1)
    assert first == drawn(7, 0) and first != drawn(8, 0)
    assert result.stdout == f"--- sample 1 of 2\n{first}\n\n--- sample 2 of 2\n{second}\n"


def test_a_workdir_of_another_task_is_one_line_and_exit_2(lm_workdir):
    result = run_cli("experiments.predict", "--workdir", str(lm_workdir), "--text", "abc")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {lm_workdir} holds a 'lm' model (causal_lm); "
                                    "experiments.predict applies ner and multilabel models")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    if not HAVE_CLUENER:
        pytest.skip(CLUENER_MISSING)
    tmp = tmp_path_factory.mktemp("predict")
    workdir = tmp / "run"
    train("configs/cluener_globalpointer.py", workdir, **{
        "data.manual_dir": CLUENER_DIR, "data.data_dir": str(tmp / "tfds"),
        "train.num_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
    return workdir, tmp


@needs_cluener
@pytest.mark.slow
def test_predictions_parse_as_cluener_and_round_trip_through_the_scorer(ner_run):
    workdir, tmp = ner_run
    dev = Path(CLUENER_DIR, "dev.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    (tmp / "dev12.jsonl").write_text("\n".join(dev) + "\n", encoding="utf-8")
    out = tmp / "pred.jsonl"
    result = run_cli("experiments.predict", "--workdir", str(workdir), "--input",
                     str(tmp / "dev12.jsonl"), "--output", str(out), "--batch_size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(dev)

    trained = kexue.load(workdir)
    names = trained.type_names
    forward = jitted(trained.model)
    decode = jax.jit(ops.decode_spans, static_argnames="max_spans")
    tp = fp = fn = 0
    counts = {"tp": 0.0, "fp": 0.0, "fn": 0.0}
    for line, gold_line in zip(lines, dev, strict=True):
        text, predicted = data.parse_cluener_line(line, types=names)
        gold_text, gold = data.parse_cluener_line(gold_line, types=names)
        assert text == gold_text
        # The same spans as decoding the model's logits directly (ops.decode_spans).
        ids = trained.tokenizer.encode(text)
        logits = forward(ids[None], valid=np.ones((1, len(ids)), bool))
        room = len(names) * len(ids) * (len(ids) + 1) // 2  # every span i <= j
        found, _, count = decode(logits[0], max_spans=room)
        assert predicted == sorted(tuple(map(int, row)) for row in found[:int(count)])
        record = json.loads(line)
        for name, entities in record["label"].items():
            for entity, spans in entities.items():
                scores = record["scores"][name][entity]
                assert len(scores) == len(spans) and all(score > 0 for score in scores)
        tp += len(set(predicted) & set(gold))
        fp += len(set(predicted) - set(gold))
        fn += len(set(gold) - set(predicted))
        n = len(text)
        as_rows = lambda spans: np.array(spans or np.zeros((0, 3)), np.int32)[None]  # noqa: E731
        found = ops.span_f1(ops.spans_to_dense(as_rows(predicted), len(names), n) * 2.0 - 1.0,
                            ops.spans_to_dense(as_rows(gold), len(names), n))
        for key in counts:
            counts[key] += float(found[key])
    assert tp + fp > 0, "the smoke model predicted nothing: the round trip checks nothing"
    assert counts == {"tp": tp, "fp": fp, "fn": fn}
    f1 = ops.f1_from_counts(counts["tp"], counts["fp"], counts["fn"])["f1"]
    assert float(f1) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)


@pytest.mark.slow
@needs_cluener
def test_bad_texts_are_named_before_the_model_runs(ner_run, tmp_path):
    workdir, _ = ner_run
    trained = kexue.load(workdir)
    with pytest.raises(ValueError, match="line 1: empty text"):
        predict_cli.check_text("  ", trained, "line 1")
    with pytest.raises(ValueError, match=f"has 65 tokens, more than the {trained.seq_len}"):
        predict_cli.check_text("长" * 65, trained, "line 2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"label": {}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{bad}:2: expected an object with a string"):
        predict_cli.read_inputs(str(bad))
    result = run_cli("experiments.predict", "--workdir", str(workdir), "--text", "")
    assert result.returncode == 2 and result.stderr == "error: --text #1: empty text\n"
