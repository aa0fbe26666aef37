"""Peak host memory of a training run on a corpus with one huge file, against a small one.

    python -m tests.reliability.input_memory --megabytes 500

Writes two corpora into a temporary directory (deleted at the end): three small text
files, and the same three plus one generated file of `--megabytes` MB (Python-like
lines). For each corpus it builds the `text_files` dataset in one process and trains
the lm_stdlib smoke preset on it (`--steps` steps) in another, and reports each
process's peak resident memory (`ru_maxrss`). The training difference is what the
input pipeline holds because of the big file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from kexue.data.text_files import _eval_score
from tests.reliability.kill_resume import ROOT, worker_env

_PEAK = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_RSS_KIB', "
         "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr, flush=True)); ")


def _peak_mib(code: str, args: list[str]) -> tuple[float, str]:
    result = subprocess.run([sys.executable, "-c", _PEAK + code, *args], cwd=ROOT,
                            env=worker_env(), capture_output=True, text=True, check=False)
    found = re.findall(r"^PEAK_RSS_KIB (\d+)$", result.stderr, re.M)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(found[-1]) / 1024, result.stdout


def _write_corpus(root: str, megabytes: int) -> str:
    os.makedirs(root)
    for i in range(3):
        with open(os.path.join(root, f"small{i}.txt"), "w", encoding="utf-8") as file:
            file.writelines(f"def small_{i}_{j}(x):\n    return x + {j}\n" for j in range(2000))
    if megabytes:
        name = next(f"big{i}.txt" for i in range(100) if _eval_score(f"big{i}.txt") >= 0.05)
        block = "".join(f"def function_{j}(value):\n    return value * {j} + {j % 7}\n"
                        for j in range(20000)).encode("utf-8")
        with open(os.path.join(root, name), "wb") as file:
            for _ in range(megabytes * 2**20 // len(block)):
                file.write(block)
    return os.path.join(root, "*.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="input_memory_")
    rows = []
    try:
        for label, megabytes in (("small corpus", 0), (f"+ one {args.megabytes} MB file",
                                                       args.megabytes)):
            pattern = _write_corpus(os.path.join(root, f"corpus{megabytes}"), megabytes)
            data_dir = os.path.join(root, f"tfds{megabytes}")
            build, _ = _peak_mib("from kexue.data import make_builder, prepare; "
                                 "prepare(make_builder('text_files', sys.argv[1], "
                                 "pattern=sys.argv[2]))", [data_dir, pattern])
            train, _ = _peak_mib(
                "sys.argv = ['train'] + sys.argv[1:]; runpy.run_module('experiments.train', "
                "run_name='__main__')",
                ["--config", "configs/lm_stdlib.py:smoke", "--workdir",
                 os.path.join(root, f"run{megabytes}"), f"--config.data.data_dir={data_dir}",
                 f"--config.data.pattern={pattern}", f"--config.train.num_steps={args.steps}",
                 "--config.train.eval_every=0"])
            rows.append((label, build, train))
            print(f"{label:24s} build peak {build:7.0f} MiB   train peak {train:7.0f} MiB",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (_, build0, train0), (_, build1, train1) = rows
    print(f"difference: build {build1 - build0:+.0f} MiB, train {train1 - train0:+.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
