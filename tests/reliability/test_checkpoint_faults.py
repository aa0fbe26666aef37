"""Faults around checkpoints: disk full / read-only while saving, non-finite stop, no pickle.

* A write that fails with ENOSPC (injected into Orbax's writer, so it runs anywhere)
  raises `CheckpointSaveError` naming the failed step and the directory, the failed
  step is never reported as saved, and the earlier checkpoints restore to exactly
  the parameters of a clean run at that step.
* The same with a real file system: `WORKDIR/checkpoints` is a small tmpfs in a
  private mount namespace (`unshare -m`, needs root) that fills up, or is remounted
  read-only, in the middle of a run.
* `max_consecutive_nonfinite` stops the run naming the step; the last checkpoint is
  kept and restores to finite parameters equal to those before the bad steps.
* Restoring never unpickles anything.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kexue.parallel import make_mesh
from kexue.train import (
    Checkpointer,
    CheckpointSaveError,
    NonFiniteError,
    abstract_train_state,
)
from tests.reliability.kill_resume import ROOT, worker_env
from tests.train import toy


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _restore(checkpoint_dir, mesh):
    checkpoints = Checkpointer(checkpoint_dir, log=lambda message: None)
    try:
        return checkpoints.restore_latest(abstract_train_state(toy.model_factory(), toy.tx(), mesh))
    finally:
        checkpoints.close()


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Orbax leaves the failed save's other write tasks on a closed event loop (sync mode);
# they only touch the failed step's temporary directory.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_checkpointing", [True, False], ids=["async", "sync"])
def test_enospc_while_saving_names_step_and_keeps_earlier_checkpoints(
        tmp_path, monkeypatch, async_checkpointing):
    mesh = _mesh()
    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_from_step_6(self, x, directory):
        if int(re.search(r"checkpoints/(\d+)", str(directory)).group(1)) >= 6:
            await asyncio.sleep(0.5)  # still writing when step 8 is saved (async)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_from_step_6)
    printed: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *args, **kw: printed.append(" ".join(
        map(str, args))))
    workdir = tmp_path / "full"
    with pytest.raises(CheckpointSaveError) as caught:
        toy.run(str(workdir), mesh, 10, checkpoint_every=2,
                async_checkpointing=async_checkpointing, tensorboard=False)
    message = str(caught.value)
    assert message.startswith(f"saving checkpoint step 6 to {workdir / 'checkpoints'} failed")
    assert "No space left on device" in message and "finalized steps: [2, 4]" in message
    assert not any("checkpoint saved: step 6" in line for line in printed), printed
    monkeypatch.undo()

    restored = _restore(workdir / "checkpoints", mesh)
    assert restored.step == 4 and restored.data_state == {"index": 4}
    clean = toy.run(str(tmp_path / "clean"), mesh, 4, tensorboard=False)
    _assert_same_params(restored.state.params, clean.state.params)
    _assert_same_params(restored.state.opt_state, clean.state.opt_state)


def _can_mount_private_tmpfs(directory) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {directory}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("fault, flags", [("fill-disk", []), ("read-only", ["--sync"])])
def test_real_disk_full_or_read_only_checkpoint_dir(tmp_path, fault, flags):
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    if not _can_mount_private_tmpfs(checkpoint_dir):
        pytest.skip("needs `unshare -m` and tmpfs mounts (root); the ENOSPC injection test "
                    "above covers the same code path without them")
    command = (f"mount -t tmpfs -o size=2m tmpfs {checkpoint_dir} && exec {sys.executable} "
               f"-m tests.reliability._train_worker {tmp_path} --steps 12 --checkpoint-every 2 "
               f"--{fault}-at-step 5 " + " ".join(flags))
    run = subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=ROOT, env=worker_env(),
                         capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    error = re.search(r"^ERROR CheckpointSaveError: saving checkpoint step (\d+) to (\S+) "
                      r"failed: (.*)$", run.stdout, re.M)
    assert error, output
    failed, directory, reason = int(error[1]), error[2], error[3]
    assert directory == str(checkpoint_dir)
    assert ("No space left on device" if fault == "fill-disk" else "Read-only file system") \
        in reason
    reported = [int(s) for s in re.findall(r"checkpoint saved: step (\d+)", run.stdout)]
    assert failed not in reported and failed >= 6 - 2 * (fault == "fill-disk")
    restored = json.loads(re.search(r"^RESTORED (.*)$", run.stdout, re.M)[1])
    assert reported and max(reported) <= restored["step"] < failed
    assert set(reported) <= set(restored["steps_on_disk"])
    assert restored["data_state"] == {"index": restored["step"]} and restored["params_finite"]


def test_nonfinite_stop_names_step_and_last_good_checkpoint_restores(tmp_path):
    mesh = _mesh()
    with pytest.raises(NonFiniteError, match=r"^step 8: the loss, the gradients or the updated "
                                             r"state were non-finite in 3 consecutive steps.*"
                                             r"the last checkpoint is kept"):
        toy.run(str(tmp_path / "nan"), mesh, 20, poison=tuple(range(5, 20)), log_every=10,
                checkpoint_every=2, max_consecutive_nonfinite=3, tensorboard=False)
    checkpoint_dir = tmp_path / "nan" / "checkpoints"
    assert sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()) == [2, 4, 6]
    restored = _restore(checkpoint_dir, mesh)
    assert restored.step == 6 and int(restored.state.nonfinite_steps) == 1
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(
        restored.state.params))
    clean = toy.run(str(tmp_path / "clean"), mesh, 5, tensorboard=False)  # step 6 was skipped
    _assert_same_params(restored.state.params, clean.state.params)
    _assert_same_params(restored.state.opt_state, clean.state.opt_state)


def test_restore_never_unpickles(tmp_path, monkeypatch):
    mesh = _mesh()
    toy.run(str(tmp_path), mesh, 2, tensorboard=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint restore called pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    assert _restore(tmp_path / "checkpoints", mesh).step == 2
