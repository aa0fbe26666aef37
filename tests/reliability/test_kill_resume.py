"""Repeated `kill -9` of a training process: every restart resumes from the newest
finalized checkpoint, no reported checkpoint is lost, and the final parameters and
loss curve equal an uninterrupted run's bit for bit (the fast version of
`python -m tests.reliability.kill_resume --kills 20`)."""

from __future__ import annotations

from tests.reliability.kill_resume import kill_resume


def test_three_random_sigkills_then_exact_resume(tmp_path, rng):
    seed = int(rng.integers(2**31))
    lines: list[str] = []
    summary = kill_resume(kills=3, seed=seed, steps=24, checkpoint_every=3, step_sleep=0.02,
                          workdir=str(tmp_path), echo=lines.append)
    report = "\n".join(lines)
    assert summary["kills"] == 3 and summary["restarts"] == 3, report
    assert summary["checkpoints_lost"] == 0 and summary["resumed_not_from_newest"] == 0, report
    assert summary["loss_curve_equal"] and summary["final_params_equal"], report
    assert summary["ok"], report
