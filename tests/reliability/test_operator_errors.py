"""Failures an operator meets: one clear line, before training where it can be known, and
nothing changed in the workdir by a command its checks refuse.

Command line (`experiments.train`, `experiments.evaluate`, lm_stdlib smoke preset):
a refused resume (another width) leaves the workdir byte-identical, `config.json`
included; `optimizer.clip_norm=nan`, a workdir that is a file and a `checkpoints`
that is a file fail at once with one line; a damaged `config.json` stops evaluate
with one line naming the file; evaluate on a read-only workdir prints its metrics.
Library: a full disk is reported as the save error even when TensorBoard fails too;
unreadable lines of `metrics.jsonl` do not block a resume; CLUENER without its dev
file or with too many spans fails before the first batch; downloads with the network
unreachable fail within 10 s naming `data.manual_dir`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kexue.data import make_dataset
from kexue.parallel import make_mesh
from kexue.train import CheckpointSaveError, TensorBoardWriter, report_failure
from tests.conftest import CLUENER_DIR, CLUENER_MISSING, HAVE_CLUENER
from tests.reliability.kill_resume import ROOT, worker_env
from tests.train import toy


def _cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _train(workdir, data_dir, *overrides: str) -> subprocess.CompletedProcess:
    # kexue's own sources as the corpus: built in seconds, unlike the standard library.
    return _cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke", "--workdir",
                str(workdir), f"--config.data.data_dir={data_dir}",
                f"--config.data.pattern={ROOT}/kexue/**/*.py", "--config.eval.sample_tokens=0",
                *overrides)


def _snapshot(root) -> dict[str, tuple[int, bytes]]:
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            content = b"" if os.path.isdir(path) else open(path, "rb").read()
            out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, content)
    return out


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step lm_stdlib smoke run (checkpoint at step 2) and its data directory."""
    root = tmp_path_factory.mktemp("cli")
    workdir, data_dir = root / "run", root / "tfds"
    result = _train(workdir, data_dir, "--config.train.num_steps=2",
                    "--config.train.eval_every=2", "--config.train.checkpoint_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, data_dir


@pytest.mark.slow
def test_refused_resume_leaves_the_workdir_byte_identical(finished_run):
    workdir, data_dir = finished_run
    before = _snapshot(workdir)
    result = _train(workdir, data_dir, "--config.train.num_steps=4",
                    "--config.model.width=64")
    assert result.returncode == 1, result.stderr[-3000:]
    line = _one_error_line(result)
    assert line.startswith(f"error: CheckpointMismatchError: checkpoint {workdir}/checkpoints/2 "
                           "does not fit the model"), line
    assert "shape differs" in result.stderr and "Use a fresh --workdir" in result.stderr
    assert _snapshot(workdir) == before


def test_nan_clip_norm_is_rejected_before_anything_is_built(tmp_path):
    result = _cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke", "--workdir",
                  str(tmp_path / "run"), "--config.optimizer.clip_norm=nan")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config key `optimizer.clip_norm`: expected a finite number; got nan" in \
        result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout, message", [
    ("workdir-file", "is a file, not a directory"),
    ("checkpoints-file", "checkpoints is a file, not the checkpoint directory"),
    ("empty", "the workdir is empty"),
])
def test_unusable_workdir_fails_at_once_in_one_line(tmp_path, layout, message):
    workdir = tmp_path / "run"
    if layout == "workdir-file":
        workdir.write_text("not a directory")
    elif layout == "checkpoints-file":
        workdir.mkdir()
        (workdir / "checkpoints").write_text("not a directory")
    before = _snapshot(tmp_path)
    started = time.monotonic()
    result = _cli("experiments.train", "--config", "configs/lm_stdlib.py:smoke",
                  "--workdir=" + ("" if layout == "empty" else str(workdir)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in _one_error_line(result)
    assert "resolved config" not in result.stdout  # before the data and the model
    assert time.monotonic() - started < 30
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_damaged_config_json_stops_evaluate_with_one_line(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    (workdir / "config.json").write_text('{"preset": "smoke",\n  "data": {')
    result = _cli("experiments.evaluate", "--workdir", str(workdir))
    assert result.returncode == 1, result.stderr[-3000:]
    line = _one_error_line(result)
    assert f"{workdir}/config.json:2 is damaged" in line and "rerun the training command" in line


def _can_mount_read_only(directory) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {directory} {directory}"
                            f" && mount -o remount,ro,bind {directory} {directory}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_evaluate_on_a_read_only_workdir_prints_the_metrics(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    if not _can_mount_read_only(workdir):
        pytest.skip("needs `unshare -m` and bind mounts (root)")
    before = _snapshot(workdir)
    command = (f"mount --bind {workdir} {workdir} && mount -o remount,ro,bind {workdir} "
               f"{workdir} && exec {sys.executable} -m experiments.evaluate --workdir {workdir}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=ROOT, env=worker_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^step 2 eval: \{.*\"loss\"", result.stdout, re.M), result.stdout
    assert "is not writable; the metrics are only printed" in result.stderr
    assert _snapshot(workdir) == before


# ----------------------------------------------------------------------------- library


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_is_reported_as_the_save_error_when_tensorboard_fails_too(tmp_path,
                                                                             monkeypatch):
    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_from_step_4(self, x, directory):
        if int(re.search(r"checkpoints/(\d+)", str(directory)).group(1)) >= 4:
            await asyncio.sleep(0)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    def tensorboard_disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device (flushing events)")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_from_step_4)
    monkeypatch.setattr(TensorBoardWriter, "close", tensorboard_disk_full)
    logged: list[str] = []
    from kexue.train import LoopConfig, train_loop

    with pytest.raises(CheckpointSaveError) as caught:
        train_loop(model_factory=toy.model_factory(), loss_fn=toy.loss_fn, tx=toy.tx(),
                   train_data=toy.RegressionBatches(8), mesh=_mesh(), workdir=str(tmp_path),
                   config=LoopConfig(num_steps=6, log_every=1, checkpoint_every=2,
                                     async_checkpointing=False, tensorboard=True),
                   log=logged.append)
    assert "saving checkpoint step 4" in str(caught.value)
    assert "No space left on device" in str(caught.value).splitlines()[0]
    assert any("while stopping on an error, also: OSError" in line for line in logged), logged

    stream = __import__("io").StringIO()
    assert report_failure(caught.value, workdir=str(tmp_path), stream=stream) == 1
    printed = stream.getvalue().splitlines()
    assert len(printed) == 1 and printed[0].startswith("error: CheckpointSaveError: saving "
                                                       "checkpoint step 4")
    assert printed[0].endswith(f"(traceback in {tmp_path}/error.log)")
    assert "Traceback (most recent call last)" in (tmp_path / "error.log").read_text()


def test_unreadable_metrics_lines_do_not_block_a_resume(tmp_path):
    mesh = _mesh()
    reference = toy.run(str(tmp_path / "reference"), mesh, 6, tensorboard=False)
    toy.run(str(tmp_path / "run"), mesh, 4, tensorboard=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "ab") as file:
        file.write(b"\xff\xfe not UTF-8\n[1, 2, 3]\n{\"split\": \"train\"}\n{\"step\": 3, \"lo")
    resumed = toy.run(str(tmp_path / "run"), mesh, 6, tensorboard=False)
    for new, old in zip(jax.tree.leaves(resumed.state.params),
                        jax.tree.leaves(reference.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    def train_curve(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, path.open())
                if r["split"] == "train"]

    assert train_curve(metrics) == train_curve(tmp_path / "reference" / "metrics.jsonl")
    assert (tmp_path / "run" / "metrics.jsonl.unreadable").read_bytes().count(b"\n") == 4


needs_cluener = pytest.mark.skipif(not HAVE_CLUENER, reason=CLUENER_MISSING)


def _cluener_config(data_dir, manual_dir, **overrides):
    config = dict(name="cluener", task="ner", tokenizer="char", data_dir=str(data_dir),
                  manual_dir=None if manual_dir is None else str(manual_dir), seq_len=64,
                  batch_size=8, num_threads=0)
    config.update(overrides)
    return config


@needs_cluener
def test_cluener_without_dev_file_or_with_too_many_spans_fails_before_batching(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with open(os.path.join(CLUENER_DIR, "train.jsonl"), "rb") as file:
        (manual / "train.jsonl").write_bytes(b"".join(line for _, line in zip(
            range(100), file, strict=False)))
    with pytest.raises(FileNotFoundError, match=r"data\.manual_dir=.*: no dev\.jsonl or "
                                                r"dev\.json in it\. CLUENER needs"):
        make_dataset(_cluener_config(tmp_path / "tfds", manual), "train", process_index=0,
                     process_count=1)
    shutil.copy(manual / "train.jsonl", manual / "dev.jsonl")
    with pytest.raises(ValueError, match=r"more than data\.max_spans=1: set "
                                         r"--config\.data\.max_spans=\d+"):
        make_dataset(_cluener_config(tmp_path / "tfds", manual, max_spans=1), "train",
                     process_index=0, process_count=1)


_OFFLINE = textwrap.dedent("""
    import json, sys, time
    from kexue.data import make_dataset
    for name, task, tokenizer in (("cluener", "ner", "char"), ("tiny_shakespeare", "lm",
                                                               "byte")):
        config = dict(name=name, task=task, tokenizer=tokenizer, data_dir=sys.argv[1],
                      text_key="text", num_threads=0)
        started = time.monotonic()
        try:
            make_dataset(config, "train", process_index=0, process_count=1)
            outcome = "built"
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
        print(json.dumps({"name": name, "seconds": time.monotonic() - started,
                          "outcome": outcome}), flush=True)
""")


def test_downloads_fail_within_10_s_when_the_network_is_unreachable(tmp_path):
    # All HTTPS goes through a proxy at an address that never answers (TEST-NET-1,
    # RFC 5737), so the download cannot work on any machine.
    env = {**worker_env(), "https_proxy": "http://192.0.2.1:9", "http_proxy":
           "http://192.0.2.1:9"}
    result = subprocess.run([sys.executable, "-c", _OFFLINE, str(tmp_path / "tfds")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [o["name"] for o in outcomes] == ["cluener", "tiny_shakespeare"], result.stdout
    for outcome in outcomes:
        assert outcome["seconds"] < 10, outcome
        assert outcome["outcome"].startswith("ConnectionError: cannot download "), outcome
        assert "192.0.2.1:9" in outcome["outcome"] and "data.manual_dir" in outcome["outcome"]
    assert "--config.data.manual_dir=DIR" in outcomes[0]["outcome"]


def test_network_probe_gives_up_after_its_time_limit(monkeypatch):
    from kexue.data import sources

    released = threading.Event()

    def never_answers(address, timeout=None):
        released.wait(30)  # a host that does not answer until the test ends
        raise OSError(errno.ETIMEDOUT, "timed out")

    monkeypatch.setattr(sources, "PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(sources.socket, "create_connection", never_answers)
    started = time.monotonic()
    try:
        reason = sources._probe("https://storage.example/archive.zip")
    finally:
        released.set()
    assert time.monotonic() - started < 3
    assert reason == "storage.example:443: no answer in 1 s"
