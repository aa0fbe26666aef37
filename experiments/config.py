"""Experiment configs: load a config file, check every key and value, save and read back.

    config = load("configs/lm_stdlib.py", preset="smoke", overrides={"train.num_steps": 20})
    check(config)                        # unknown keys, bad values: fail before anything runs
    save(config, workdir)                # <workdir>/config.json, read back by `load_saved`

A config file defines `get_config(preset="full")`, which applies its own preset
(`configs/common.py:with_preset`); the command line (`--config configs/x.py:smoke
--config.a.b=v`) gives the preset after the colon and overrides that `config_flags`
applies last. `load` does the same for code (the studies, the tests): the file is
executed once.

Sections: `preset`, `seed`, `data` (`kexue.data.DataConfig`), `model`
(`kexue.models.ModelSpec`; `vocab_size`, `num_types` and `num_classes` come from the
data; `model.init_from`, see below), `optimizer` (`name`, `clip_norm` and one section per optimizer,
`kexue.optim.optimizer_defaults`), `train` (`kexue.train.LoopConfig`), `mesh` (`data`,
`fsdp`, `tensor`), `objective` and `eval` (the task's settings, `TASK_KEYS`). Errors
name the config key (`config key `data.seq_len`: expected …`), with the nearest valid
key for a misspelling.

`model.init_from = PATH` (models `INIT_FROM_MODELS`) starts the encoder from a
pretrained BERT / RoFormer checkpoint (`kexue.models.load_pretrained`): the
checkpoint fixes the encoder's architecture, so `model` keys left unset (None) are
filled from it and a key that is set must agree with it (`dropout_rate`, `dtype`,
`remat` and the other `kexue.models.pretrained.RUNTIME_KEYS` may differ). It needs
`data.tokenizer = "wordpiece"`; `data.vocab_file` defaults to the checkpoint's
`vocab.txt` (`data_settings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections

from kexue.data import DATA_FIELDS, DataConfig
from kexue.models import MODEL_KEYS, ModelSpec, TransformerConfig, checkpoint_vocab_file
from kexue.optim import OPTIMIZERS, optimizer_defaults
from kexue.parallel import MESH_AXES
from kexue.tasks import LOSSES, POSITIONS
from kexue.train import LoopConfig, WorkdirError, read_json, write_json_atomic

__all__ = ["CONFIG_FILE", "INIT_FROM_MODELS", "TASK_KEYS", "check", "check_overrides",
           "config_keys", "data_settings", "load", "load_saved", "model_settings", "save"]

CONFIG_FILE = "config.json"
TOP_KEYS = ("preset", "seed", "data", "model", "optimizer", "train", "mesh", "objective",
            "eval")
#: Allowed keys of `config.objective` and `config.eval` for each `data.task`.
TASK_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "lm": {"objective": (), "eval": ("sample_prompt", "sample_tokens", "lengths")},
    "mlm": {"objective": ("positions",), "eval": ("lengths",)},
    "ner": {"objective": ("rdrop_alpha",), "eval": ()},
    "multilabel": {"objective": ("loss",), "eval": ()},
}
_NAMED = re.compile(r"^`(\w+)`")
#: Models whose RoFormer encoder `model.init_from` can fill.
INIT_FROM_MODELS = ("global_pointer_ner", "bio_tagger", "multilabel_classifier")


@contextlib.contextmanager
def config_keys(section: str, aliases: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raises a library `ValueError` that starts with "`name`: …" as "config key
    `section.name`: …" (`aliases` maps a library argument to its config key)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        named = _NAMED.match(message)
        if named is None:
            raise ValueError(f"config section `{section}`: {message}") from error
        key = (aliases or {}).get(named.group(1), named.group(1))
        raise ValueError(f"config key `{section}.{key}`{message[named.end():]}") from error


def load(config_file: str, *, preset: str = "full",
         overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`get_config(preset)` of `config_file` with flat `"a.b"` overrides applied on top."""
    spec = importlib.util.spec_from_file_location("_kexue_experiment_config", config_file)
    if spec is None or not os.path.isfile(config_file):
        raise ValueError(f"config file {config_file!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.update_from_flattened_dict(dict(overrides or {}))
    return config


def _near(key: str, choices: Any) -> str:
    near = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean `{near[0]}`?" if near else f"; valid keys: {sorted(choices)}"


def _check_keys(section: Any, known: Any, prefix: str) -> None:
    for key in section.keys():
        if key not in known:
            raise ValueError(f"unknown config key `{prefix}{key}`{_near(key, known)}")


def _check_number(key: str, value: Any, *, least: float, inclusive: bool = True) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (value >= least if inclusive else value > least))
    if not ok:
        bound = f">= {least}" if inclusive else f"> {least}"
        raise ValueError(f"config key `{key}`: expected a finite number {bound}; got {value!r}")


def _check_optimizer(section: Any) -> None:
    _check_keys(section, ("name", "clip_norm", *OPTIMIZERS), "optimizer.")
    name = section.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"config key `optimizer.name`: expected one of {list(OPTIMIZERS)}; "
                         f"got {name!r}")
    if "amos_factored" in section:
        raise ValueError("config key `optimizer.amos_factored`: amos_factored reads the "
                         "settings of `optimizer.amos`")
    for sub in section.keys():
        if sub in ("name", "clip_norm"):
            continue
        defaults = optimizer_defaults(sub)
        _check_keys(section[sub], defaults, f"optimizer.{sub}.")
        for key, value in section[sub].items():
            if isinstance(defaults[key], float) or key == "learning_rate":
                _check_number(f"optimizer.{sub}.{key}", value, least=0.0,
                              inclusive=key != "learning_rate")
    sub = "amos" if name == "amos_factored" else name
    if sub not in section:
        raise ValueError(f"optimizer {name!r} needs the section `optimizer.{sub}`")
    _check_number("optimizer.clip_norm", section.get("clip_norm", 0.0), least=0.0)


def _check_lengths(config: ml_collections.ConfigDict, task: str) -> None:
    lengths = config.get("eval", {}).get("lengths", ())
    if (not isinstance(lengths, tuple | list) or not lengths
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                       for n in lengths) or len(set(lengths)) != len(lengths)):
        raise ValueError(f"config key `eval.lengths`: expected a non-empty tuple of "
                         f"distinct positive ints; got {lengths!r}")
    if task == "lm" and any(max(lengths) % n for n in lengths):
        raise ValueError(f"config key `eval.lengths`: expected lengths that divide the "
                         f"largest, {max(lengths)} (every length is cut from the same "
                         f"windows of that length); got {tuple(lengths)!r}")


def data_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.data` as `kexue.data.DataConfig` fields: with `tokenizer="wordpiece"`
    and no `vocab_file`, the `vocab.txt` next to `model.init_from` (if any)."""
    settings = config.data.to_dict()
    init_from = config.get("model", {}).get("init_from")
    if settings.get("tokenizer") == "wordpiece" and not settings.get("vocab_file") and init_from:
        settings["vocab_file"] = checkpoint_vocab_file(init_from)
    return settings


def model_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model` as `kexue.models.ModelSpec` settings: without `init_from` and the
    keys left unset (None), which a pretrained checkpoint fills."""
    return {key: value for key, value in config.model.to_dict().items()
            if key != "init_from" and value is not None}


def _check_init_from_path(config: ml_collections.ConfigDict) -> None:
    """`model.init_from` names something that exists; without it, no encoder key is unset."""
    init_from = config.model.get("init_from")
    if init_from is None:
        defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
        unset = [key for key, value in config.model.items()
                 if value is None and key in defaults and defaults[key] is not None]
        if unset:
            raise ValueError(f"config key `model.{unset[0]}`: no value for {unset}; they are "
                             "filled from a pretrained checkpoint: set `model.init_from` to "
                             "one, or give them")
    elif not isinstance(init_from, str) or not init_from:
        raise ValueError(f"config key `model.init_from`: expected the path of a BERT / "
                         f"RoFormer checkpoint; got {init_from!r}")
    elif not os.path.exists(init_from):
        raise ValueError(f"config key `model.init_from`: {init_from} does not exist")


def _check_init_from(config: ml_collections.ConfigDict, data: DataConfig) -> None:
    """A model `init_from` can fill, and the WordPiece tokenizer it needs."""
    if config.model.get("init_from") is None:
        return
    if config.model.get("name") not in INIT_FROM_MODELS:
        raise ValueError(f"config key `model.init_from`: a pretrained encoder fills the "
                         f"models {list(INIT_FROM_MODELS)}; got model.name="
                         f"{config.model.get('name')!r}")
    if data.tokenizer != "wordpiece":
        raise ValueError(f"config key `data.tokenizer`: `model.init_from` needs the "
                         f"checkpoint's vocabulary: expected 'wordpiece'; got "
                         f"{data.tokenizer!r}")


def check(config: ml_collections.ConfigDict) -> None:
    """Every key known and every value sensible, before anything is built or compiled.

    Raises:
      ValueError: naming the config key (with the nearest valid key for a
        misspelling), what was expected and what was given.
    """
    _check_keys(config, TOP_KEYS, "")
    _check_finite(config.to_dict(), "")
    for key in ("data", "model", "optimizer", "train"):
        if key not in config:
            raise ValueError(f"the config needs a `{key}` section")
    _check_keys(config.data, DATA_FIELDS, "data.")
    _check_init_from_path(config)
    settings = data_settings(config)
    if settings.get("tokenizer") == "wordpiece" and not settings.get("vocab_file"):
        raise ValueError("config key `data.vocab_file`: tokenizer 'wordpiece' needs a BERT "
                         "vocab.txt: set it, or set `model.init_from` to a checkpoint with a "
                         "vocab.txt next to it; got none")
    with config_keys("data"):
        data = DataConfig.from_settings(settings)
    task = data.task
    for section in ("objective", "eval"):
        _check_keys(config.get(section, {}), TASK_KEYS[task][section], f"{section}.")
    known_model = {"name", "init_from",
                   *(field.name for field in dataclasses.fields(TransformerConfig)),
                   *(key for keys in MODEL_KEYS.values() for key in keys)}
    _check_keys(config.model, known_model, "model.")
    _check_init_from(config, data)
    if config.model.get("init_from") is None:  # else checked against the checkpoint by run
        with config_keys("model"):
            ModelSpec.from_settings(model_settings(config))
    _check_keys(config.get("mesh", {}), MESH_AXES, "mesh.")
    _check_keys(config.train, [field.name for field in dataclasses.fields(LoopConfig)],
                "train.")
    with config_keys("train"):
        loop = LoopConfig.from_settings(config.train)
    _check_optimizer(config.optimizer)
    objective = config.get("objective", {})
    if task == "mlm" and objective.get("positions", "contiguous") not in POSITIONS:
        raise ValueError(f"config key `objective.positions`: expected one of "
                         f"{list(POSITIONS)}; got {objective.positions!r}")
    if task == "multilabel" and objective.get("loss", "zlpr") not in LOSSES:
        raise ValueError(f"config key `objective.loss`: expected one of {list(LOSSES)}; "
                         f"got {objective.loss!r}")
    if task == "ner":
        alpha = objective.get("rdrop_alpha", 0.0)
        _check_number("objective.rdrop_alpha", alpha, least=0.0)
        if alpha > 0 and config.model.get("name") != "global_pointer_ner":
            raise ValueError(f"config key `objective.rdrop_alpha`: R-Drop uses the "
                             f"GlobalPointer divergence, so it needs "
                             f"model.name='global_pointer_ner' (or rdrop_alpha=0); got "
                             f"rdrop_alpha={alpha!r} with model.name={config.model.get('name')!r}")
    if task == "mlm" or (task == "lm" and "lengths" in config.get("eval", {})):
        _check_lengths(config, task)
    if loop.best_metric and loop.eval_every and loop.checkpoint_every % loop.eval_every:
        raise ValueError(f"config key `train.checkpoint_every`: expected a multiple of "
                         f"`train.eval_every` = {loop.eval_every} (the best checkpoint is "
                         f"tracked at eval steps); got {loop.checkpoint_every}")


def _check_finite(tree: Mapping[str, Any], prefix: str) -> None:
    """No setting is NaN or ±inf (`clip_norm=nan` would silently switch clipping off)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key `{prefix}{key}`: expected a finite number; "
                             f"got {value!r}")


def check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Overrides (flat `"a.b.c"` keys, e.g. from the command line) that would be ignored
    are errors: the config holds every optimizer's section, and only the one of
    `optimizer.name` is read.

    Raises:
      ValueError: naming the ignored keys and the section that is read.
    """
    name = config.optimizer.get("name")
    used = "amos" if name == "amos_factored" else name
    ignored = sorted(key for key in overrides
                     if key.split(".")[0] == "optimizer" and len(key.split(".")) > 2
                     and key.split(".")[1] in OPTIMIZERS and key.split(".")[1] != used)
    if ignored:
        raise ValueError(
            f"config key `{ignored[0]}`: optimizer.name is {name!r}, which reads "
            f"`optimizer.{used}` only, so {', '.join(ignored)} would be ignored; choose "
            f"that optimizer with --config.optimizer.name={ignored[0].split('.')[1]} "
            "or drop the setting")


def save(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes `<workdir>/config.json` (process 0); returns keys that differ from the saved one."""
    path = os.path.join(workdir, CONFIG_FILE)
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    changed: dict[str, str] = {}
    old = None
    if os.path.exists(path):
        try:
            old = read_json(path, what="the run's config")
        except WorkdirError as error:  # replaced below by the config of this run
            print(f"{error}; writing this run's config over it", flush=True)
    if old is not None:
        flat_old, flat_new = _flatten(old), _flatten(new)
        changed = {key: f"{flat_old.get(key)!r} -> {flat_new.get(key)!r}"
                   for key in sorted(set(flat_old) | set(flat_new))
                   if flat_old.get(key) != flat_new.get(key)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(path, new)
    return changed


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_saved(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run saved in `workdir`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} not found")
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: is {workdir!r} the workdir of a "
                         "`python -m experiments.train` run?")
    record = read_json(path, what="the run's config, written by experiments.train: rerun "
                                  "the training command (it writes it again) or restore it")
    return ml_collections.ConfigDict(_tuples(record))


def _tuples(tree: Any) -> Any:
    """JSON lists back to tuples (configs hold tuples, e.g. `eval.lengths`)."""
    if isinstance(tree, dict):
        return {key: _tuples(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(value) for value in tree)
    return tree
