"""Re-evaluate a checkpoint of a training run with the config saved in its workdir.

    python -m experiments.evaluate --workdir runs/lm_stdlib [--step 200 | --best]

Reads `<workdir>/config.json` (written by `experiments.train`), rebuilds the mesh,
data, model, task and optimizer state layout from it (`experiments.run`), restores
the newest readable checkpoint (or `--step N`, or `--best`: the best by the run's
`train.best_metric`), runs the same evaluation as training does, prints the metrics
and writes them to `<workdir>/evaluate.json`. For a language model it also prints the
greedy sample. `--mesh=data,fsdp,tensor` evaluates on another mesh shape
(checkpoints restore onto any shape). A missing workdir or checkpoint, or a bad flag,
is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from kexue.parallel import initialize_distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of experiments.train.")
_MESH = flags.DEFINE_list("mesh", None, "Mesh sizes data,fsdp,tensor (default: as trained).")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step to evaluate: a number, 'latest' "
                            "(the default) or 'best'.")
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best checkpoint (by train.best_metric).")
flags.mark_flag_as_required("workdir")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every step at INFO
        logging.set_verbosity(logging.WARNING)
    info = initialize_distributed()

    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.saved import resolve_step
    from kexue.train import Checkpointer, abstract_train_state, evaluate, make_eval_step

    workdir = os.path.abspath(_WORKDIR.value)
    if _BEST.value and _STEP.value not in (None, "best"):
        _fail(f"--best and --step={_STEP.value} name different checkpoints; give one")
    try:
        config = experiment_config.load_saved(workdir)
        if _MESH.value:
            sizes = [int(size) for size in _MESH.value]
            if len(sizes) != 3:
                raise ValueError(f"--mesh takes three sizes data,fsdp,tensor; got {sizes}")
            config.mesh.update(dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)))
        requested = "best" if _BEST.value else _STEP.value
        step = resolve_step(os.path.join(workdir, "checkpoints"), requested)
        experiment_config.check(config)
        run = experiment_run.build(config)
    except (ValueError, TypeError, KeyError) as error:
        _fail(str(error))
    abstract = abstract_train_state(run.model_factory, run.tx, run.mesh, seed=run.loop.seed)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        restored = (checkpoints.restore_latest(abstract) if requested in (None, "latest")
                    else checkpoints.restore(step, abstract))
    finally:
        checkpoints.close()
    eval_step = make_eval_step(run.task.eval_stats, abstract, run.mesh)
    metrics = evaluate(eval_step, restored.state, run.eval_data(), run.mesh, run.task.finalize)
    if info.process_index != 0:
        return
    print(f"step {restored.step} eval: " + json.dumps(metrics, sort_keys=True), flush=True)
    with open(os.path.join(workdir, "evaluate.json"), "w", encoding="utf-8") as file:
        json.dump({"step": restored.step, "eval": metrics}, file, indent=2, sort_keys=True)
        file.write("\n")
    experiment_run.print_sample(config, restored.state.model(), run.train_data.tokenizer)


if __name__ == "__main__":
    app.run(main)
