"""Trains the toy model for many steps until SIGTERM arrives; exits 0 when preempted.

Usage: python -m tests.train._preempt_worker WORKDIR
"""

from __future__ import annotations

import sys

import jax

from kexue.parallel import make_mesh
from tests.train import toy


def main(workdir: str) -> int:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    result = toy.run(workdir, mesh, 100_000, checkpoint_every=50_000, log_every=1)
    print(f"WORKER-DONE step={result.step} preempted={result.preempted}", flush=True)
    return 0 if result.preempted else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
