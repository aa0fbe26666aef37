"""What a checkpoint and a finished run's record may hold: no bit flips, no NaN, no empty metrics.

* Two bytes flipped inside a parameter's stored bytes in a real checkpoint data file:
  the checksums catch it, the writer moves the step aside and resumes from the
  previous one, a read-only reader skips it and moves nothing.
* An update that turns the parameters non-finite from finite gradients (a learning
  rate far too large) is skipped and counted like a NaN gradient, the bound stops the
  run, and no checkpoint holds NaN/Inf; a state with NaN parameters is never saved.
* `final_metrics.json` after a SIGTERM during the last step, and after a kill between
  the final checkpoint and writing the file: complete, with the final evaluation.
"""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kexue.optim import parameter_path
from kexue.parallel import make_mesh
from kexue.train import (
    Checkpointer,
    CheckpointSaveError,
    LoopConfig,
    NonFiniteError,
    abstract_train_state,
    create_train_state,
    make_train_step,
    state_checksums,
    train_loop,
)
from tests.train import toy


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _params(state) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def _finite(tree) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


def _tree_snapshot(root) -> dict[str, tuple[int, bytes]]:
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, file.read())
    return out


# ----------------------------------------------------------------------------- checksums


def _numpy_checksum(leaf: np.ndarray) -> str:
    """Independent reference of the module doc's hash, in NumPy uint32/uint64 arithmetic."""
    leaf = np.asarray(leaf)
    words = (leaf.astype(np.uint8).astype(np.uint32) if leaf.dtype == np.bool_ else
             leaf.view(np.uint32)).reshape(-1).astype(np.uint64)
    index = np.arange(words.size, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)

    def mul(a, b):  # 32-bit products, kept below 2**64 before reducing
        return ((a & mask) * (b & mask)) & mask

    h = words ^ ((mul(index, np.uint64(0x9E3779B9)) + np.uint64(0x243F6A88)) & mask)
    h = h ^ (h >> np.uint64(16))
    h = mul(h, np.uint64(0x85EBCA6B))
    h = h ^ (h >> np.uint64(13))
    h = mul(h, np.uint64(0xC2B2AE35))
    h = h ^ (h >> np.uint64(16))
    first = int(h.sum(dtype=np.uint64) & mask)
    second = int(mul(h, (np.uint64(2) * index + np.uint64(1)) & mask).sum(dtype=np.uint64) & mask)
    return f"{first:08x}{second:08x}"


def test_checksums_match_a_numpy_reference_on_any_mesh(rng):
    one = create_train_state(toy.model_factory(), toy.tx(), _mesh())
    eight = create_train_state(toy.model_factory(), toy.tx(),
                               make_mesh(2, 2, 2, devices=jax.devices()[:8]))
    sums = state_checksums(one)
    assert state_checksums(eight) == sums  # sharded over 8 devices, the same numbers
    flat = jax.tree_util.tree_flatten_with_path({
        "params": one.params, "opt_state": one.opt_state, "step": one.step,
        "rng": jax.random.key_data(one.rng)})[0]
    for path, leaf in flat:
        assert sums[parameter_path(path)] == _numpy_checksum(np.asarray(leaf)), parameter_path(path)
    w1 = np.asarray(one.params["w1"])
    for _ in range(5):  # any one flipped bit changes the hash
        bits = w1.copy().view(np.uint32)
        bits.flat[rng.integers(bits.size)] ^= np.uint32(1 << int(rng.integers(32)))
        assert _numpy_checksum(bits.view(np.float32)) != sums["params/w1"]
    swapped = w1.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere
    assert _numpy_checksum(swapped) != sums["params/w1"]


# ----------------------------------------------------------------------------- bit flips


class _Wide(toy.MLP):
    """The toy MLP with 512 hidden units: arrays above OCDBT's 1 KiB inline limit are
    stored as (zstd) values in a data file that nothing else checks."""

    def __init__(self, *, rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = toy.make_param(rngs, init, (toy.IN_DIM, 512), ("embed", "mlp"))
        self.b1 = toy.make_param(rngs, nnx.initializers.zeros, (512,), ("mlp",))
        self.w2 = toy.make_param(rngs, init, (512, toy.OUT_DIM), ("mlp", "embed"))
        self.b2 = toy.make_param(rngs, nnx.initializers.zeros, (toy.OUT_DIM,), ("embed",))


def _run_wide(workdir, num_steps):
    return train_loop(model_factory=toy.model_factory(cls=_Wide), loss_fn=toy.loss_fn,
                      tx=toy.tx(), train_data=toy.RegressionBatches(8), mesh=_mesh(),
                      config=LoopConfig(num_steps=num_steps, checkpoint_every=2,
                                        tensorboard=False),
                      workdir=str(workdir), log=lambda message: None)


def test_bit_flip_in_a_checkpoint_file_is_caught_and_the_previous_one_used(tmp_path):
    workdir = tmp_path / "run"
    _run_wide(workdir, 4)
    step_2 = _run_wide(tmp_path / "two", 2)
    files = [os.path.join(d, name) for d, _, names in os.walk(workdir / "checkpoints" / "4")
             for name in names]
    largest = max(files, key=os.path.getsize)  # the data file holding the arrays
    with open(largest, "r+b") as file:
        data = bytearray(file.read())
        for index in (len(data) // 2, len(data) // 2 + 7):
            data[index] ^= 0x40
        file.seek(0)
        file.write(bytes(data))

    abstract = abstract_train_state(toy.model_factory(cls=_Wide), toy.tx(), _mesh())
    before = _tree_snapshot(workdir)
    logged: list[str] = []
    reader = Checkpointer(workdir / "checkpoints", read_only=True, log=logged.append)
    restored = reader.restore_latest(abstract)
    assert restored.step == 2 and [step for step, _ in restored.skipped] == [4], logged
    assert "from the checksums saved at save time" in restored.skipped[0][1]
    assert _tree_snapshot(workdir) == before  # the reader moved nothing

    writer = Checkpointer(workdir / "checkpoints", log=logged.append)
    try:
        restored = writer.restore_latest(abstract)
    finally:
        writer.close()
    assert restored.step == 2
    for new, old in zip(_params(restored.state), _params(step_2.state), strict=True):
        np.testing.assert_array_equal(new, old)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert [name.split("-")[0] for name in os.listdir(workdir / "corrupt_checkpoints")] == ["4"]


# ----------------------------------------------------------------------------- non-finite


def _overflow_from(count: int) -> optax.GradientTransformation:
    """Multiplies the updates by +inf once the optimizer has taken `count` steps: finite
    loss and gradients, non-finite new parameters (as a far too large learning rate)."""

    def init(params):
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        del params
        scale = jnp.where(state["count"] >= count, jnp.inf, 1.0).astype(jnp.float32)
        return (jax.tree.map(lambda u: u * scale, updates),
                {"count": state["count"] + 1})

    return optax.chain(toy.tx(), optax.GradientTransformation(init, update))


def test_update_that_makes_parameters_nonfinite_is_skipped_and_never_saved(tmp_path):
    mesh = _mesh()
    tx = _overflow_from(3)
    config = LoopConfig(num_steps=20, log_every=1, checkpoint_every=2,
                        max_consecutive_nonfinite=3, tensorboard=False)
    with pytest.raises(NonFiniteError, match=r"^step 6: the loss, the gradients or the "
                                             r"updated state were non-finite in 3 consecutive"):
        train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn, tx=tx,
                   train_data=toy.RegressionBatches(8), mesh=mesh, config=config,
                   workdir=str(tmp_path / "run"), log=lambda message: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)
    reader = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True,
                          log=lambda message: None)
    assert reader.all_steps() == [2, 4]
    for step in reader.all_steps():
        assert _finite(reader.restore(step, abstract).state.params), step
    clean = toy.run(str(tmp_path / "clean"), mesh, 3, tensorboard=False)
    for new, old in zip(_params(reader.restore(4, abstract).state), _params(clean.state),
                        strict=True):
        np.testing.assert_array_equal(new, old)  # step 4 changed nothing


def test_train_step_skips_only_the_overflowing_step(rng):
    mesh = _mesh()
    tx = _overflow_from(2)
    abstract = abstract_train_state(toy.model_factory(), tx, mesh)
    step = make_train_step(toy.loss_fn, tx, abstract, mesh, donate=False)
    state = create_train_state(toy.model_factory(), tx, mesh)
    batch = {"x": rng.normal(size=(8, toy.IN_DIM)).astype(np.float32),
             "y": rng.normal(size=(8, toy.OUT_DIM)).astype(np.float32)}
    history = []
    for _ in range(3):
        before = state
        state, metrics = step(state, batch)
        history.append((before, state, metrics))
    assert [int(m["nonfinite"]) for _, _, m in history] == [0, 0, 1]
    before, after, metrics = history[-1]
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    for new, old in zip(_params(after), _params(before), strict=True):
        np.testing.assert_array_equal(new, old)
    assert int(after.step) == 3 and int(after.nonfinite_steps) == 1
    assert _finite(after.opt_state)


def test_a_state_with_nan_parameters_is_never_saved(tmp_path):
    mesh = _mesh()
    state = create_train_state(toy.model_factory(), toy.tx(), mesh)
    poisoned = state.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan), state.params))
    checkpoints = Checkpointer(tmp_path / "checkpoints", log=lambda message: None)
    try:
        with pytest.raises(CheckpointSaveError, match=r"not saving checkpoint step 0: NaN/Inf "
                                                      r"in 4 arrays \(params/"):
            checkpoints.save(poisoned)
    finally:
        checkpoints.close()
    assert checkpoints.all_steps() == []


# ----------------------------------------------------------------------------- final metrics


class _SigtermAt(toy.RegressionBatches):
    """Sends this process SIGTERM while fetching batch `index` (inside that step)."""

    def __init__(self, index: int):
        super().__init__(8)
        self.signal_at = index

    def __next__(self):
        if self.index == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def _run(workdir, data, num_steps=6):
    return train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn, tx=toy.tx(),
                      train_data=data, mesh=_mesh(), workdir=str(workdir),
                      config=LoopConfig(num_steps=num_steps, log_every=1, eval_every=3,
                                        checkpoint_every=3, tensorboard=False),
                      eval_data=toy.eval_batches, log=lambda message: None)


def _final(workdir) -> dict:
    return json.loads((workdir / "final_metrics.json").read_text())


def test_final_metrics_complete_after_sigterm_in_the_last_step(tmp_path):
    reference = _run(tmp_path / "reference", toy.RegressionBatches(8))
    expected = _final(tmp_path / "reference")
    assert expected["eval"] == reference.eval_metrics and expected["eval"]

    workdir = tmp_path / "run"
    _run(workdir, _SigtermAt(5))  # batch 5 is the input of step 6, the last
    first = _final(workdir)
    assert first["step"] == 6 and first["eval"] == expected["eval"]
    assert first["train"]["loss"] == expected["train"]["loss"]
    again = _run(workdir, toy.RegressionBatches(8))  # the documented recovery: rerun
    assert not again.preempted and _final(workdir) == first


def test_final_metrics_rewritten_complete_after_kill_before_writing_it(tmp_path):
    workdir = tmp_path / "run"
    _run(workdir, toy.RegressionBatches(8))
    expected = _final(workdir)
    os.remove(workdir / "final_metrics.json")  # killed between the last save and the write
    _run(workdir, toy.RegressionBatches(8))
    final = _final(workdir)
    assert final["step"] == 6 and final["eval"] == expected["eval"]
    assert final["train"]["loss"] == expected["train"]["loss"]
    (workdir / "final_metrics.json").write_text(json.dumps({**expected, "eval": {}}))
    _run(workdir, toy.RegressionBatches(8))  # an empty record (older kexue) is redone too
    assert _final(workdir)["eval"] == expected["eval"]
