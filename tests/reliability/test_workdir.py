"""One writer per workdir, read-only readers.

* Evaluations in a loop (restore the newest checkpoint read-only, evaluate) against a
  trainer that saves every step with asynchronous saves: the trainer finishes every
  step, every evaluation succeeds on a checksum-verified state.
* A reader changes nothing in the checkpoint directory, not even the temporary
  directory of a save in flight, and creates nothing where there is no checkpoint.
* A reader skips a step the trainer deletes while it is read, for the previous one.
* A second trainer on the same workdir exits at once naming the first one's PID and
  host; the first one finishes with its metrics intact. A file system without locks
  gets a warning, not a refusal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from kexue.parallel import make_mesh
from kexue.train import (
    Checkpointer,
    WorkdirLock,
    WorkdirLockedError,
    abstract_train_state,
    evaluate,
    loss_stats,
    make_eval_step,
)
from tests.reliability.kill_resume import finish, start_worker
from tests.train import toy


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _wait_for(log_path: str, pattern: str, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as file:
            if re.search(pattern, file.read(), re.M):
                return
        assert process.poll() is None, open(log_path).read()
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {log_path} after {timeout} s")


def _snapshot(root) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root) + "/"] = (os.stat(path).st_mtime_ns, 0, b"")
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns,
                                                    os.stat(path).st_size, file.read())
    return out


# A restore cut short by a step the trainer deletes leaves Orbax's reader tasks on a closed
# event loop; they only touch that step's (removed) files.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_evaluations_in_a_loop_while_the_trainer_saves_every_step(tmp_path):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "trainer.log")
    steps = 60
    trainer = start_worker(workdir, log_path, steps=steps, checkpoint_every=1, sync=False,
                           step_sleep=0.03)
    try:
        _wait_for(log_path, r"^checkpoint saved: step 1 ", trainer)
        mesh = _mesh()
        abstract = abstract_train_state(toy.model_factory(), toy.tx(), mesh)
        eval_step = make_eval_step(loss_stats(toy.loss_fn), abstract, mesh)
        evaluated, notes = [], []
        while trainer.poll() is None:
            reader = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                  log=notes.append)
            try:
                restored = reader.restore_latest(abstract)
            finally:
                reader.close()
            metrics = evaluate(eval_step, restored.state, toy.eval_batches(), mesh)
            assert np.isfinite(metrics["loss"]), metrics
            evaluated.append(restored.step)
    finally:
        code = finish(trainer, timeout=120)
    output = open(log_path).read()
    assert code == 0, output
    assert re.search(r'^RESULT \{"step": 60,', output, re.M), output
    assert len(evaluated) >= 5 and evaluated == sorted(evaluated), evaluated
    assert "Error" not in output and "Traceback" not in output, output
    vanished = sum("removed while being read" in note for note in notes)
    print(f"{len(evaluated)} evaluations of steps {evaluated[0]}..{evaluated[-1]}; {vanished} "
          "met a step the trainer deleted while it was read")


def test_reader_changes_nothing_and_creates_nothing(tmp_path):
    mesh = _mesh()
    toy.run(str(tmp_path / "run"), mesh, 4, tensorboard=False)
    in_flight = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "half-written").write_bytes(b"\0" * 100)
    before = _snapshot(tmp_path / "run")
    abstract = abstract_train_state(toy.model_factory(), toy.tx(), mesh)
    reader = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True,
                          log=lambda message: None)
    assert reader.all_steps() == [2, 4]
    assert reader.restore_latest(abstract).step == 4
    reader.close()
    assert _snapshot(tmp_path / "run") == before

    empty = tmp_path / "empty"
    reader = Checkpointer(empty / "checkpoints", read_only=True, log=lambda message: None)
    assert reader.restore_latest(abstract) is None
    assert not empty.exists()


def test_second_trainer_exits_at_once_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")
    first_log, second_log = str(tmp_path / "first.log"), str(tmp_path / "second.log")
    first = start_worker(workdir, first_log, steps=150, checkpoint_every=10, sync=False,
                         step_sleep=0.04)
    try:
        _wait_for(first_log, r"^BATCH 2$", first)
        second = start_worker(workdir, second_log, steps=150, checkpoint_every=10,
                              sync=False, step_sleep=0.04)
        started = time.monotonic()
        second_code = finish(second, timeout=60)
        second_s = time.monotonic() - started
        assert first.poll() is None, "the first trainer stopped while the second started"
    finally:
        first_code = finish(first, timeout=120)
    second_output = open(second_log).read()
    assert second_code != 0, second_output
    assert f"in use by PID {first.pid} on host {socket.gethostname()}" in second_output, \
        second_output
    assert "BATCH" not in second_output, second_output  # it never trained
    assert second_s < 30, second_s
    assert first_code == 0, open(first_log).read()
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 151))
    assert not os.path.exists(os.path.join(workdir, "writer.lock"))


def test_lock_is_reentrant_in_a_process_and_released(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(workdir) as outer:
        holder = json.loads((workdir / "writer.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with WorkdirLock(workdir):  # train_loop inside a command that locked first
            assert outer.held
        assert outer.held and (workdir / "writer.lock").exists()
    assert not outer.held and not workdir.exists()  # created by the lock, left empty
    workdir.mkdir()
    other = subprocess.Popen(
        ["python3", "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(workdir / "writer.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match="is in use by another process"):
            WorkdirLock(workdir).acquire()
    finally:
        other.kill()
        other.wait()
    with WorkdirLock(workdir):  # the kernel dropped the dead holder's lock
        pass


def test_reader_takes_the_previous_step_when_the_trainer_deletes_one_while_read(
        tmp_path, monkeypatch):
    mesh = _mesh()
    toy.run(str(tmp_path / "run"), mesh, 6, tensorboard=False)  # steps 2, 4, 6
    abstract = abstract_train_state(toy.model_factory(), toy.tx(), mesh)
    notes: list[str] = []
    reader = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True, log=notes.append)
    restore = Checkpointer.restore

    def deleted_while_read(self, step, target):
        if step == 6:  # the trainer's keep policy removes step 6 in the middle of the read
            shutil.rmtree(os.path.join(self.directory, "6"))
            raise FileNotFoundError(f"{self.directory}/6/state/_METADATA")
        return restore(self, step, target)

    monkeypatch.setattr(Checkpointer, "restore", deleted_while_read)
    restored = reader.restore_latest(abstract)
    assert restored.step == 4 and restored.skipped == ()
    assert any("step 6" in note and "removed while being read" in note for note in notes)
    assert not (tmp_path / "run" / "corrupt_checkpoints").exists()


def test_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with WorkdirLock(tmp_path / "run") as lock:
        assert lock.held
    assert "does not support locks (No locks available): one trainer per workdir is not " \
           "enforced there" in capsys.readouterr().err
