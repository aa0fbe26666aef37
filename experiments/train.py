"""Train a kexue model from a config file: the one command behind every experiment.

    python -m experiments.train --config configs/lm_stdlib.py --workdir runs/lm_stdlib \\
        [--config.train.num_steps=2000] [--config.mesh.fsdp=8]
    python -m experiments.train --config configs/lm_stdlib.py:smoke --workdir /tmp/s

Prints the resolved config (the file's `get_config(preset)`, then the command-line
overrides), builds the mesh, data, model, task and optimizer from it
(`experiments.run`), trains with `kexue.train.train_loop` (progress bar, evaluation
every `train.eval_every` steps, `metrics.jsonl`, TensorBoard events, Orbax
checkpoints, `final_metrics.json`) and, for a language model, prints a greedy sample.
The resolved config is saved as `<workdir>/config.json` (read back by `python -m
experiments.evaluate --workdir DIR`). Running the command again on the same workdir
resumes from the newest checkpoint.

One trainer per workdir: a second one exits at once naming the first one's PID and
host. Everything that can be checked before training is (config values, the workdir,
the data, the newest checkpoint against the model); a command refused by a check
leaves the workdir as it was (`config.json` is written only after the checks). A
failure ends in one `error:` line; its traceback goes to `<workdir>/error.log` once
training has begun (`--verbosity=1` prints it).
"""

from __future__ import annotations

import json
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kexue.parallel import initialize_distributed
from kexue.train import OPERATOR_ERRORS, report_failure

# Unknown override keys are accepted here and rejected by `experiments.config.check`,
# which names the nearest valid key.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py, optionally `:preset`).",
    lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_error(error: Exception) -> None:
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser; a misspelled section in `--config.a.b=v` exits with one clean line."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as error:
        message = re.sub(r"\\n|\n", " ", str(error))
        message = re.sub(r"[\\'\"]", "", message)
        _config_error(ValueError(f"unknown config key in the command line: {message}"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every step at INFO
        logging.set_verbosity(logging.WARNING)
    info = initialize_distributed()  # before any other JAX call
    started: list[str] = []  # the workdir, once training writes there (for error.log)
    try:
        _train(info, started)
    except OPERATOR_ERRORS as error:
        sys.exit(report_failure(error, verbose=flags.FLAGS.verbosity >= 1,
                                workdir=started[0] if started else None))


def _train(info, started: list[str]) -> None:
    from experiments import config as experiment_config
    from experiments import run as experiment_run
    from kexue.train import WorkdirLock, abstract_train_state, check_resume, check_workdir

    try:
        flag = flags.FLAGS["config"]
        overrides = config_flags.get_override_values(flag)
        if "preset" in overrides:
            raise ValueError("config key `preset`: name the preset in the config argument, "
                             "e.g. `--config configs/lm_stdlib.py:smoke`; got "
                             f"--config.preset={overrides['preset']}")
        config = _CONFIG.value
        experiment_config.check_overrides(config, overrides)
        experiment_config.check(config)
        mesh = experiment_run.mesh_from(config)
        experiment_run.check_against_mesh(config, mesh)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        _config_error(error)
    # Workdir checks, then the writer lock, before the data is built: a second trainer
    # exits at once, and nothing is written until every check has passed.
    workdir = check_workdir(_WORKDIR.value, writable=True)
    with WorkdirLock(workdir):
        try:
            run = experiment_run.build(config, mesh)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            _config_error(error)
        if info.process_index == 0:
            print("resolved config:\n" + config.to_json_best_effort(indent=2, sort_keys=True),
                  flush=True)
            print(f"mesh {dict(mesh.shape)} on {mesh.devices.size} "
                  f"{mesh.devices.flat[0].platform} device(s), {info.process_count} "
                  "process(es)", flush=True)
        check_resume(workdir, abstract_train_state(run.model_factory, run.tx, mesh,
                                                   seed=run.loop.seed))
        changed = experiment_config.save(config, workdir)  # every check passed
        started.append(workdir)
        if changed and info.process_index == 0:
            print("config differs from the saved one in this workdir (resuming anyway): "
                  + "; ".join(f"{k}: {v}" for k, v in changed.items()), flush=True)
        result = experiment_run.train(run, workdir)
    if result.preempted:
        sys.exit(0)
    if info.process_index != 0:
        return
    print("final eval: " + json.dumps(result.eval_metrics, sort_keys=True), flush=True)
    experiment_run.print_sample(config, result.state.model(), run.train_data.tokenizer)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
