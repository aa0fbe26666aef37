"""Evaluate a checkpoint of a training run.

    python -m experiments.evaluate --workdir runs/lm_stdlib [--step 200 | --best] [--output=PATH]

Reads `<workdir>/config.json` (written by `experiments.train`), rebuilds the mesh,
data, model, task and optimizer state layout from it (`experiments.run`), restores
the newest readable checkpoint (or `--step N`, or `--best`: the best by the run's
`train.best_metric`), runs the same evaluation as training does, prints the metrics
and writes them to `--output` (default `<workdir>/evaluate.json`; `-`: print only).
For a language model it also prints the greedy sample. `--mesh=data,fsdp,tensor`
evaluates on another mesh shape (checkpoints restore onto any shape).

The checkpoints are opened read-only (`Checkpointer(read_only=True)`): evaluating a
run while it trains never disturbs the trainer, and a checkpoint that the trainer
deletes while it is read is skipped for the previous one. A read-only workdir is fine
(the metrics are printed; the default output is skipped with a note). A bad flag, a
missing workdir or an unknown step is one line on stderr and exit status 2; a failure
while evaluating ends in one `error:` line and exit status 1 (`--verbosity=1` prints
the traceback).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from experiments.cli import fail
from kexue.parallel import initialize_distributed
from kexue.train import OPERATOR_ERRORS, report_failure

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of experiments.train.")
_MESH = flags.DEFINE_list("mesh", None, "Mesh sizes data,fsdp,tensor (default: as trained).")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step to evaluate: a number, 'latest' "
                            "(the default) or 'best'.")
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best checkpoint (by train.best_metric).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the metrics (JSON); default "
                              "<workdir>/evaluate.json, `-` to only print them.")
flags.mark_flag_as_required("workdir")



def _writable(path: str) -> bool:
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK) and (
        not os.path.exists(path) or os.access(path, os.W_OK))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every step at INFO
        logging.set_verbosity(logging.WARNING)
    info = initialize_distributed()
    try:
        _evaluate(info)
    except OPERATOR_ERRORS as error:
        sys.exit(report_failure(error, verbose=flags.FLAGS.verbosity >= 1))


def _evaluate(info) -> None:
    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.saved import resolve_step
    from kexue.train import (
        Checkpointer,
        abstract_train_state,
        check_workdir,
        evaluate,
        make_eval_step,
        write_json_atomic,
    )

    if _BEST.value and _STEP.value not in (None, "best"):
        fail(f"--best and --step={_STEP.value} name different checkpoints; give one")
    if not os.path.isdir(_WORKDIR.value):
        fail(f"workdir {os.path.abspath(_WORKDIR.value)!r} not found")
    workdir = check_workdir(_WORKDIR.value, writable=False)
    requested = "best" if _BEST.value else _STEP.value
    try:
        config = experiment_config.load_saved(workdir)
        if _MESH.value:
            sizes = [int(size) for size in _MESH.value]
            if len(sizes) != 3:
                raise ValueError(f"--mesh takes three sizes data,fsdp,tensor; got {sizes}")
            config.mesh.update(dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)))
        step = resolve_step(os.path.join(workdir, "checkpoints"), requested)
        experiment_config.check(config)
    except (ValueError, TypeError, KeyError) as error:
        fail(str(error))
    # Where the metrics go, settled before the evaluation runs.
    output = _OUTPUT.value or os.path.join(workdir, "evaluate.json")
    if output == "-":
        output = None
    elif not _writable(output):
        if _OUTPUT.value:
            raise OSError(f"--output={output} is not writable: pass a writable path, or "
                          "--output=- to only print the metrics")
        print(f"note: {workdir} is not writable; the metrics are only printed (pass "
              "--output=PATH to write them elsewhere)", file=sys.stderr, flush=True)
        output = None
    run = experiment_run.build(config)
    abstract = abstract_train_state(run.model_factory, run.tx, run.mesh, seed=run.loop.seed)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        restored = (checkpoints.restore_latest(abstract) if requested in (None, "latest")
                    else checkpoints.restore(step, abstract))
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: has the run saved "
                                "one yet (train.checkpoint_every)?")
    eval_step = make_eval_step(run.task.eval_stats, abstract, run.mesh)
    metrics = evaluate(eval_step, restored.state, run.eval_data(), run.mesh, run.task.finalize)
    if info.process_index != 0:
        return
    print(f"step {restored.step} eval: " + json.dumps(metrics, sort_keys=True), flush=True)
    if output is not None:
        write_json_atomic(output, {"step": restored.step, "eval": metrics})
    experiment_run.print_sample(config, restored.state.model(), run.train_data.tokenizer)


if __name__ == "__main__":
    app.run(main)
