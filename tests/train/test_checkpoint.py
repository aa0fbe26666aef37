"""Checkpoints through `train_loop`: exact resume, corrupt fallback, model mismatch, re-meshing."""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest

from kexue.parallel import make_mesh
from kexue.train import (
    Checkpointer,
    CheckpointMismatchError,
    LoopConfig,
    abstract_train_state,
    create_train_state,
)
from tests.train import toy


def _mesh(data: int = 1, fsdp: int = 1, tensor: int = 1):
    return make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _train_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _tensorboard_scalars(logdir: str, tag: str) -> dict[int, float]:
    """Reads TFRecord-framed `Event` protos (8-byte length, 4-byte crc, data, 4-byte crc)."""
    from tensorboardX.proto import event_pb2

    values = {}
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name), "rb") as file:
            data = file.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    mesh = _mesh()
    full = toy.run(str(tmp_path / "full"), mesh, 8, eval_every=4)
    stopped = toy.run(str(tmp_path / "resumed"), mesh, 3, eval_every=4)
    assert stopped.saved_steps == [2, 3]
    resumed = toy.run(str(tmp_path / "resumed"), mesh, 8, eval_every=4)
    assert resumed.saved_steps == [4, 6, 8]
    full_losses = _train_losses(tmp_path / "full")
    assert list(full_losses) == list(range(1, 9))
    assert _train_losses(tmp_path / "resumed") == full_losses
    for new, old in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params),
                        strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    losses = np.array(list(full_losses.values()))
    assert losses[-2:].mean() < losses[:2].mean()
    final = json.loads((tmp_path / "resumed" / "final_metrics.json").read_text())
    assert final["step"] == 8 and final["eval"]["loss"] == pytest.approx(full.eval_metrics["loss"])
    logged = _tensorboard_scalars(str(tmp_path / "resumed" / "tensorboard"), "train/loss")
    assert logged.keys() >= set(range(4, 9))
    assert logged[8] == pytest.approx(full_losses[8], rel=1e-6)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    mesh = _mesh()
    toy.run(str(tmp_path), mesh, 6)
    state_dir = tmp_path / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as file:
                file.truncate(3)
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-123").mkdir()  # a half-written save
    messages = []
    checkpoints = Checkpointer(tmp_path / "checkpoints", log=messages.append)
    abstract = abstract_train_state(toy.model_factory(), toy.tx(), mesh)
    restored = checkpoints.restore_latest(abstract)
    checkpoints.close()
    assert restored.step == 4 and int(restored.state.step) == 4
    assert restored.data_state == {"index": 4}
    assert [step for step, _ in restored.skipped] == [6]
    assert any("step 6" in m and "corrupt" in m for m in messages), messages
    assert os.listdir(tmp_path / "corrupt_checkpoints")


def test_checkpoint_of_another_model_is_rejected_with_paths(tmp_path):
    mesh = _mesh()
    toy.run(str(tmp_path), mesh, 2)
    checkpoints = Checkpointer(tmp_path / "checkpoints", log=lambda message: None)
    abstract = abstract_train_state(toy.model_factory(cls=toy.WiderMLP), toy.tx(), mesh)
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoints.restore_latest(abstract)
    checkpoints.close()
    message = str(error.value)
    assert "params/w1: (4, 16) vs (4, 32)" in message
    assert "params/gain: (2,)" in message and "not in the checkpoint" in message
    assert "opt_state/0/mu/w1" in message


def test_restore_onto_another_mesh_shape(tmp_path):
    source_mesh = _mesh(2, 2, 2)
    tx = toy.tx()
    state = create_train_state(toy.model_factory(3), tx, source_mesh)
    writer = Checkpointer(tmp_path, log=lambda message: None)
    assert writer.save(state, data_state=b"\x00opaque")
    writer.close()
    target_mesh = _mesh(1, 4, 1)
    reader = Checkpointer(tmp_path, log=lambda message: None)
    restored = reader.restore_latest(abstract_train_state(toy.model_factory(), tx, target_mesh))
    reader.close()
    assert restored.data_state == b"\x00opaque"
    assert restored.state.params["w1"].sharding.mesh.shape == target_mesh.shape
    for new, old in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
            new, old = jax.random.key_data(new), jax.random.key_data(old)
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_best_checkpoint_is_kept(tmp_path):
    checkpoints = Checkpointer(tmp_path, keep=1, best_metric="loss", log=lambda message: None)
    state = create_train_state(toy.model_factory(), toy.tx(), _mesh())
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)]:
        checkpoints.save(state.replace(step=state.step + step), metrics={"loss": loss})
        checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4]
    assert checkpoints.saved_steps == [1, 2, 3, 4]
    checkpoints.close()


def test_loop_config_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ValueError, match="did you mean `checkpoint_every`"):
        LoopConfig.from_settings({"num_steps": 3, "checkpoint_evry": 2})
    with pytest.raises(ValueError, match="`log_every`: expected an int >= 1; got 0"):
        LoopConfig.from_settings({"num_steps": 3, "log_every": 0})
