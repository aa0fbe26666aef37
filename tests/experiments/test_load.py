"""`kexue.load`: a trained model back from its workdir, parameters only, onto one device.

The runs are in-process smoke runs of `configs/lm_stdlib.py` on a two-file corpus in a
temporary directory (a build of seconds), trained by `experiments.run.train` exactly
as `experiments.train` does.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

import kexue
from tests.experiments._runs import run_cli, train_lm, write_corpus


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Two steps on the 2x2x2 mesh of the eight CPU devices, a checkpoint at each."""
    tmp = tmp_path_factory.mktemp("load")
    pattern = write_corpus(tmp / "corpus")
    workdir = tmp / "run"
    run, result = train_lm(workdir, tmp / "tfds", pattern, **{
        "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    return workdir, run, result


def test_load_restores_a_2x2x2_checkpoint_onto_one_device(sharded_run):
    workdir, run, result = sharded_run
    trained_params = jax.tree.leaves(result.state.params)
    assert max(len(leaf.sharding.device_set) for leaf in trained_params) == 8
    assert any(not leaf.sharding.is_fully_replicated for leaf in trained_params)

    trained = kexue.load(workdir)
    assert trained.step == 2 and trained.kind == "lm" and trained.spec == run.spec
    loaded = jax.tree.leaves(nnx.state(trained.model, nnx.Param))
    assert len(loaded) == len(trained_params)
    for leaf in loaded:
        assert leaf.sharding.device_set == {jax.devices()[0]}
    for ours, theirs in zip(loaded, trained_params, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    tokens = trained.tokenizer.encode("def f(x):\n    return x")[None, :]
    np.testing.assert_allclose(np.asarray(trained.model(tokens)),
                               np.asarray(result.state.model()(tokens)), rtol=1e-5,
                               atol=1e-5)


def test_load_reads_the_settings_and_the_tokenizer_back(sharded_run):
    workdir, run, _ = sharded_run
    trained = kexue.load(workdir, step=1)
    assert trained.step == 1 and trained.seq_len == run.data.seq_len
    assert trained.tokenizer.vocab_size == run.spec.transformer.vocab_size == 261
    assert trained.task == run.task
    assert trained.config["data"]["pattern"] == run.config.data.pattern
    saved = json.loads((workdir / "model.json").read_text())
    assert saved["model"] == run.spec.settings()


def test_best_step_is_the_lowest_eval_loss_of_metrics_jsonl(sharded_run):
    workdir, _, _ = sharded_run
    evals = [record for record in map(json.loads, (workdir / "metrics.jsonl").open())
             if record["split"] == "eval"]
    lowest = min(evals, key=lambda record: (record["loss"], record["step"]))["step"]
    assert kexue.load(workdir, step="best").step == lowest


@pytest.mark.parametrize("step, message", [
    (7, "`step`: expected one of the saved steps [1, 2], 'latest' or 'best'; got 7"),
    ("first", "`step`: expected one of the saved steps [1, 2]"),
])
def test_unknown_step_names_the_saved_ones(sharded_run, step, message):
    workdir, _, _ = sharded_run
    with pytest.raises(ValueError, match=re.escape(message)):
        kexue.load(workdir, step=step)


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        kexue.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=re.escape("model.json not found")):
        kexue.load(tmp_path)


def test_evaluate_cli_reevaluates_a_chosen_step_on_another_mesh(sharded_run):
    workdir, _, _ = sharded_run
    result = run_cli("experiments.evaluate", "--workdir", str(workdir), "--step", "1",
                     "--mesh", "1,1,1")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((workdir / "evaluate.json").read_text())
    logged = next(r for r in map(json.loads, (workdir / "metrics.jsonl").open())
                  if r["split"] == "eval" and r["step"] == 1)
    assert again["step"] == 1
    assert again["eval"]["loss"] == pytest.approx(logged["loss"], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (("--step", "9"), "error: `step`: expected one of the saved steps [1, 2], 'latest' or "
                      "'best'; got 9\n"),
    (("--best", "--step", "1"), "error: --best and --step=1 name different checkpoints"),
])
def test_evaluate_cli_names_a_bad_step_in_one_line(sharded_run, args, message):
    workdir, _, _ = sharded_run
    result = run_cli("experiments.evaluate", "--workdir", str(workdir), *args)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_cli_names_a_missing_workdir(tmp_path):
    result = run_cli("experiments.evaluate", "--workdir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr == f"error: workdir '{tmp_path / 'nope'}' not found\n"


def test_a_checkpoint_whose_arrays_differ_from_its_checksums_is_refused(sharded_run, tmp_path):
    """The checksum saved for one parameter of step 2 no longer matches its array (as after
    a bit flip in the file): `load` refuses that step, naming it, and still loads step 1."""
    import shutil

    workdir, _, _ = sharded_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    meta_path = copy / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    name = next(path for path in sorted(meta["checksums"]) if path.startswith("params/"))
    meta["checksums"][name] = f"{int(meta['checksums'][name], 16) ^ 1:016x}"
    meta_path.write_text(json.dumps(meta))
    message = f"checkpoint {copy / 'checkpoints' / '2'}: 1 array differs from the checksums"
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        kexue.load(copy, step=2)
    assert name in str(raised.value)
    assert kexue.load(copy, step=1).step == 1


def test_time_load_reports_both_ways_at_the_same_step(sharded_run, tmp_path):
    from experiments import time_load

    workdir, _, result = sharded_run
    out = tmp_path / "load.json"
    record = time_load.main(["--workdir", str(workdir), "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert {row["step"] for row in record["ways"].values()} == {2}
    assert record["parameters"] == sum(leaf.size for leaf in jax.tree.leaves(result.state.params))
    assert all(row["first_s"] > 0 for row in record["ways"].values())
