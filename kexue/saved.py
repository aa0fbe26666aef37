"""A trained model from its workdir: the parameters of one checkpoint, the tokenizer, the settings.

    import kexue
    trained = kexue.load("runs/lm_stdlib")                 # newest checkpoint, one device
    trained = kexue.load("runs/gp", step="best", mesh=mesh)
    trained.model, trained.tokenizer, trained.type_names, trained.step, trained.settings

A training run (`experiments.train`, through `save_model_info`) writes what a reader
needs next to its checkpoints, so a workdir is self-contained:

* `<workdir>/model.json`: the model's settings (`kexue.models.ModelSpec.settings()`),
  the task (`kind`: "lm", "mlm", "ner" or "multilabel", the `kexue.tasks` settings,
  the entity-type or class names), the training sequence length, the tokenizer's
  kind and file, and the data settings (`kexue.data.DataConfig` fields) for reference;
* the tokenizer's vocabulary: `tokenizer.json` (character vocabulary) or `vocab.txt`
  (WordPiece); the byte tokenizer needs none.

`load` restores only the `params` and `model_state` subtrees of the checkpoint's
`state` item (Orbax partial restore onto an abstract target): no optimizer state, no
data pipeline, no training config. Checkpoints written on any mesh restore onto one
device (default) or onto a given mesh, each parameter placed by its logical axes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from kexue import models, tasks
from kexue.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer
from kexue.data.wordpiece import WordPieceTokenizer
from kexue.parallel import DEFAULT_RULES, LogicalRules, make_mesh

__all__ = ["MODEL_FILE", "TASK_CLASSES", "Trained", "checkpoint_steps", "load",
           "read_model_info", "resolve_step", "save_model_info"]

MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"
_FORMAT = "kexue.trained_model"
_VERSION = 1
#: `model.json` task kind → its `kexue.tasks` class.
TASK_CLASSES: dict[str, type] = {"lm": tasks.LMTask, "mlm": tasks.MLMTask,
                                 "ner": tasks.NERTask, "multilabel": tasks.MultiLabelTask}


def _write_json(path: str, payload: Any) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2, sort_keys=True, ensure_ascii=False)
        file.write("\n")
    os.replace(temporary, path)


def _save_tokenizer(tokenizer: Tokenizer, workdir: str) -> dict[str, Any]:
    """Writes the tokenizer's vocabulary into `workdir`; returns its `model.json` entry."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, CharTokenizer):
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))
        return {"kind": "char", "file": "tokenizer.json"}
    if isinstance(tokenizer, WordPieceTokenizer):
        path = os.path.join(workdir, "vocab.txt")
        with open(f"{path}.tmp{os.getpid()}", "w", encoding="utf-8") as file:
            file.writelines(token + "\n" for token in tokenizer.tokens)
        os.replace(f"{path}.tmp{os.getpid()}", path)
        return {"kind": "wordpiece", "file": "vocab.txt", "lowercase": tokenizer.lowercase}
    raise ValueError(f"`tokenizer`: expected a ByteTokenizer, CharTokenizer or "
                     f"WordPieceTokenizer; got {type(tokenizer).__name__}")


def _load_tokenizer(entry: Mapping[str, Any], workdir: str) -> Tokenizer:
    kind = entry.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    path = os.path.join(workdir, str(entry.get("file")))
    if kind in ("char", "wordpiece") and not os.path.isfile(path):
        raise ValueError(f"{path} not found: the {kind} tokenizer of {workdir!r} is missing")
    if kind == "char":
        return CharTokenizer.load(path)
    if kind == "wordpiece":
        return WordPieceTokenizer(path, lowercase=bool(entry.get("lowercase", True)))
    raise ValueError(f"{os.path.join(workdir, MODEL_FILE)}: unknown tokenizer kind {kind!r}")


def save_model_info(workdir: str | os.PathLike, *, spec: models.ModelSpec, kind: str,
                    task: Any, tokenizer: Tokenizer, seq_len: int,
                    type_names: tuple[str, ...] = (),
                    data: Mapping[str, Any] | None = None) -> None:
    """Writes `<workdir>/model.json` and the tokenizer's vocabulary (process 0 only).

    Args:
      workdir: the run directory (created if missing).
      spec: the trained model.
      kind: the task: one of `TASK_CLASSES`.
      task: its `kexue.tasks` object (a dataclass; its fields are saved).
      tokenizer: the tokenizer of the training data.
      seq_len: tokens per training example.
      type_names: entity types (ner) or class names (multilabel), in id order.
      data: the data settings, kept for reference (JSON-serialisable values).
    """
    if kind not in TASK_CLASSES:
        raise ValueError(f"`kind`: expected one of {list(TASK_CLASSES)}; got {kind!r}")
    if jax.process_index() != 0:
        return
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, MODEL_FILE), {
        "format": _FORMAT, "version": _VERSION, "model": spec.settings(),
        "task": {"kind": kind, "settings": dataclasses.asdict(task),
                 "type_names": list(type_names)},
        "seq_len": int(seq_len), "tokenizer": _save_tokenizer(tokenizer, workdir),
        "data": json.loads(json.dumps(dict(data or {}), default=list))})


def read_model_info(workdir: str | os.PathLike) -> dict[str, Any]:
    """The contents of `<workdir>/model.json`, checked.

    Raises:
      ValueError: the workdir does not exist, holds no `model.json`, or the file is not
        one written by `save_model_info`.
    """
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} not found")
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: {workdir!r} is not the workdir of a training "
                         "run (`python -m experiments.train` writes it before step 1)")
    try:
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({type(error).__name__}: "
                         f"{error})") from error
    if not isinstance(info, dict) or info.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a kexue model description (format {_FORMAT!r})")
    if info.get("version") != _VERSION:
        raise ValueError(f"{path} has version {info.get('version')!r}; this kexue reads "
                         f"version {_VERSION}")
    if info.get("task", {}).get("kind") not in TASK_CLASSES:
        raise ValueError(f"{path}: unknown task kind {info.get('task', {}).get('kind')!r}")
    return info


# ------------------------------------------------------------------------- checkpoints


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finalized checkpoints in `directory`, ascending (read-only).

    Orbax writes a step into a temporary directory and renames it to the bare step
    number once complete, so only directories named by an integer count.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _read_meta(directory: str, step: int) -> dict[str, Any]:
    """The `meta` item of checkpoint `step` (`kexue.train.Checkpointer` writes it)."""
    path = os.path.join(directory, str(step), "meta", "metadata")
    try:
        with open(path, encoding="utf-8") as file:
            meta = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _best_step(directory: str, steps: list[int]) -> int:
    ranked = []
    for step in steps:
        meta = _read_meta(directory, step)
        name, metrics = meta.get("best_metric"), meta.get("metrics") or {}
        if name and name in metrics:
            sign = -1.0 if meta.get("best_mode", "min") == "max" else 1.0
            ranked.append((sign * float(metrics[name]), step, name))
    if not ranked:
        raise ValueError(f"`step`: 'best' needs checkpoints saved with evaluation metrics "
                         f"and a `best_metric`; none of the steps {steps} in {directory} "
                         "has them: give a step number or 'latest'")
    return min(ranked)[1]


def resolve_step(directory: str | os.PathLike, step: int | str | None = None) -> int:
    """The checkpoint step meant by `step` among those in `directory`.

    Args:
      directory: a checkpoint directory (`<workdir>/checkpoints`).
      step: an int (a saved step), "latest" or None (the newest), or "best" (the best
        by the `best_metric` recorded with the checkpoints; ties: the earliest).

    Raises:
      ValueError: no checkpoint, an unknown step, or "best" without recorded metrics.
    """
    directory = os.fspath(directory)
    steps = checkpoint_steps(directory)
    if not steps:
        raise ValueError(f"no checkpoint in {directory}")
    if step is None or step == "latest":
        return steps[-1]
    if step == "best":
        return _best_step(directory, steps)
    if isinstance(step, str) and step.isdigit():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step not in steps:
        raise ValueError(f"`step`: expected one of the saved steps {steps}, 'latest' or "
                         f"'best'; got {step!r}")
    return step


def _restore_params(directory: str, step: int, target: Mapping[str, Any]) -> dict[str, Any]:
    """The `target` subtrees (e.g. `params`) of checkpoint `step`'s `state` item, laid out
    with the shardings of `target`'s `jax.ShapeDtypeStruct` leaves."""
    import orbax.checkpoint as ocp

    path = os.path.join(directory, str(step), "state")
    target = dict(target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        try:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        except Exception as error:  # any read or shape problem: name the checkpoint
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            raise ValueError(f"checkpoint {path} could not be restored onto the model of "
                             f"{MODEL_FILE} ({type(error).__name__}: {first})") from error


def _verify(directory: str, step: int, restored: Mapping[str, Any]) -> None:
    """The restored arrays against the checksums saved with the checkpoint (a checkpoint
    written without them is loaded as it is)."""
    from kexue.train.checkpoint import checksum_mismatches

    expected = _read_meta(directory, step).get("checksums")
    if not expected:
        return
    differ = checksum_mismatches(restored, expected)
    if differ:
        raise ValueError(
            f"checkpoint {os.path.join(directory, str(step))}: {len(differ)} "
            f"arra{'ys differ' if len(differ) > 1 else 'y differs'} from the checksums saved "
            f"with it ({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}): the files "
            "changed after saving (disk, copy or transfer error); load another step")


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Trained:
    """A trained model as `load` returns it.

    Attributes:
      model: the `nnx.Module` with the checkpoint's parameters, in evaluation mode.
      spec: its `kexue.models.ModelSpec`.
      kind: the task: "lm", "mlm", "ner" or "multilabel".
      task: the `kexue.tasks` task it was trained with.
      tokenizer: the tokenizer of its training data.
      type_names: entity types (ner) or class names (multilabel), in id order.
      seq_len: tokens per training example.
      step: the checkpoint's step.
      settings: the contents of `model.json`.
      config: the resolved experiment config (`config.json`) as a dict, None without one.
      workdir: the run directory.
    """

    model: nnx.Module
    spec: models.ModelSpec
    kind: str
    task: Any
    tokenizer: Tokenizer
    type_names: tuple[str, ...]
    seq_len: int
    step: int
    settings: dict[str, Any]
    config: dict[str, Any] | None
    workdir: str


def _abstract_model(spec: models.ModelSpec, mesh: Mesh, rules: LogicalRules) -> Any:
    """`(graphdef, params, model_state)` of the model as sharded `ShapeDtypeStruct`s: the
    parameter layout of `kexue.train.abstract_train_state` (with no optimizer state)."""
    from kexue.train.state import abstract_train_state

    abstract = abstract_train_state(lambda: models.build_model(spec, rngs=nnx.Rngs(0)),
                                    optax.identity(), mesh, rules)
    return abstract.graphdef, abstract.params, abstract.model_state


def load(workdir: str | os.PathLike, step: int | str | None = None, *,
         mesh: Mesh | None = None, rules: LogicalRules = DEFAULT_RULES) -> Trained:
    """The model of a training run with the parameters of one checkpoint.

    Args:
      workdir: the run directory of `experiments.train` (or of any run that called
        `save_model_info` and saved `kexue.train.Checkpointer` checkpoints under
        `<workdir>/checkpoints`).
      step: a saved step, "latest" (None) or "best" (by the run's `best_metric`).
      mesh: where the parameters go, placed by their logical axes and `rules`
        (None: the first device).
      rules: logical-axis rules.

    Returns:
      A `Trained` (model in evaluation mode, tokenizer, names, settings, step).

    Raises:
      ValueError: no such workdir, no `model.json`, no such checkpoint, or a
        checkpoint that does not fit the model described.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    info = read_model_info(workdir)
    spec = models.ModelSpec.from_settings(info["model"])
    tokenizer = _load_tokenizer(info.get("tokenizer", {}), workdir)
    task_info = info["task"]
    kind = task_info["kind"]
    task = TASK_CLASSES[kind](**task_info.get("settings", {}))
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    chosen = resolve_step(directory, step)
    if mesh is None:
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params, model_state = _abstract_model(spec, mesh, rules)
    restored = _restore_params(directory, chosen, {"params": params,
                                                   "model_state": model_state})
    _verify(directory, chosen, restored)
    model = nnx.merge(graphdef, restored["params"], restored["model_state"])
    model.eval()
    config_path = os.path.join(workdir, "config.json")
    config = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    return Trained(model=model, spec=spec, kind=kind, task=task, tokenizer=tokenizer,
                   type_names=tuple(task_info.get("type_names", ())),
                   seq_len=int(info["seq_len"]), step=chosen, settings=info, config=config,
                   workdir=workdir)
