"""Re-evaluate the newest checkpoint of a training run with the config saved in its workdir.

    python -m experiments.evaluate --workdir runs/lm_stdlib

Reads `<workdir>/config.json` (written by `experiments.train`), rebuilds the mesh,
data, model, task and optimizer state layout from it (`experiments.run`), restores
the newest readable checkpoint, runs the same evaluation as training does, prints
the metrics and writes them to `<workdir>/evaluate.json`. For a language model it
also prints the greedy sample. `--mesh=data,fsdp,tensor` evaluates on another mesh
shape (checkpoints restore onto any shape).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from kexue.parallel import initialize_distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of experiments.train.")
_MESH = flags.DEFINE_list("mesh", None, "Mesh sizes data,fsdp,tensor (default: as trained).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every step at INFO
        logging.set_verbosity(logging.WARNING)
    info = initialize_distributed()

    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.train import Checkpointer, abstract_train_state, evaluate, make_eval_step

    workdir = os.path.abspath(_WORKDIR.value)
    config = experiment_config.load_saved(workdir)
    if _MESH.value:
        sizes = [int(size) for size in _MESH.value]
        if len(sizes) != 3:
            raise app.UsageError(f"--mesh takes three sizes data,fsdp,tensor; got {sizes}")
        config.mesh.update(dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)))
    experiment_config.check(config)
    run = experiment_run.build(config)
    abstract = abstract_train_state(run.model_factory, run.tx, run.mesh, seed=run.loop.seed)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        restored = checkpoints.restore_latest(abstract)
    finally:
        checkpoints.close()
    if restored is None:
        print(f"no checkpoint in {workdir}/checkpoints", file=sys.stderr)
        sys.exit(1)
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
