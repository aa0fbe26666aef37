"""From a resolved config to what `kexue.train.train_loop` needs: shared by train and evaluate.

    config = resolve_config(config, presets, overrides)   # file < preset < command line
    check_config(config)                                  # unknown keys, bad values: fail early
    task = build_task(config, mesh)                       # data, model factory, losses
    tx = build_optimizer(config, task.model_factory)

Config sections (see configs/*.py): `preset`, `seed`, `data` (`kexue.data`), `model`
(`kexue.models.build_model`; `vocab_size`, `num_types`, `num_classes` and `seq_len`
are filled from the data), `optimizer` (`name` and one sub-section per optimizer),
`train` (`kexue.train.LoopConfig`), `mesh` (`data`, `fsdp`, `tensor`), `objective`
and `eval` (task options, `TASK_KEYS`).

Evaluation sees the whole evaluation set as one batch: each group of batches is
stacked on a second axis (`[B, K, ...]`) and the eval loss scans over `K`, summing
counts, so every metric is exact over the set (span F1 from summed tp/fp/fn, accuracy
over all masked tokens), not a mean of per-batch values.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kexue import models, ops, optim
from kexue.data import CLUENER_TYPES, DataIterator, default_data_config, make_dataset
from kexue.parallel import MESH_AXES
from kexue.train import LoopConfig, WorkdirError, read_json

__all__ = ["CONFIG_FILE", "PRESET_FULL", "Task", "build_optimizer", "build_task",
           "check_config", "load_presets", "load_saved_config", "optimizer_config",
           "resolve_config", "sample_text", "save_config"]

CONFIG_FILE = "config.json"
PRESET_FULL = "full"
TOP_KEYS = ("preset", "seed", "data", "model", "optimizer", "train", "mesh", "objective",
            "eval")
#: Allowed keys of `config.objective` and `config.eval` for each `data.task`.
TASK_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "lm": {"objective": (), "eval": ("sample_prompt", "sample_tokens", "lengths")},
    "mlm": {"objective": ("positions",), "eval": ("lengths",)},
    "ner": {"objective": ("rdrop_alpha",), "eval": ()},
    "multilabel": {"objective": ("loss",), "eval": ()},
}
POSITIONS = ("contiguous", "random_equal_mean")
MULTILABEL_LOSSES = ("zlpr", "sigmoid_bce")
OPTIMIZERS = ("adamw", "amos", "amos_factored", "amos_style")
#: Keys of each optimizer sub-section (`amos_factored` reads `optimizer.amos`).
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("learning_rate", "b1", "b2", "eps", "weight_decay", "warmup_steps",
              "schedule"),
    "amos": ("learning_rate", "beta", "zeta", "momentum"),
    "amos_style": ("learning_rate", "base", "half_life", "kind", "q", "warmup_steps",
                   "b1", "b2"),
}
ADAMW_SCHEDULES = ("constant", "cosine")


# ----------------------------------------------------------------------------- config


def optimizer_config(name: str, *, learning_rate: float | None = None,
                     **chosen: Any) -> ml_collections.ConfigDict:
    """The `config.optimizer` section: `name`, `clip_norm` and every optimizer's settings.

    `learning_rate` and `chosen` (other keys) go to the section of `name`, so a run can
    switch optimizer with `--config.optimizer.name=adamw` and find sane defaults.
    """
    sections = {
        "adamw": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.98, "eps": 1e-8,
                  "weight_decay": 0.01, "warmup_steps": 50, "schedule": "cosine"},
        "amos": {"learning_rate": 0.05, "beta": 0.98, "zeta": 0.25, "momentum": 0.9},
        "amos_style": {"learning_rate": 0.01, "base": "adam", "half_life": 1000,
                       "kind": "inverse_square", "q": 1.0, "warmup_steps": 0, "b1": 0.9,
                       "b2": 0.98},
    }
    target = sections["amos" if name == "amos_factored" else name]
    if learning_rate is not None:
        target["learning_rate"] = learning_rate
    target.update(chosen)
    return ml_collections.ConfigDict({"name": name, "clip_norm": 0.0, **sections})


def _near(key: str, choices: list[str] | tuple[str, ...]) -> str:
    near = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean `{near[0]}`?" if near else f"; valid keys: {sorted(choices)}"


def _check_keys(section: Any, known: tuple[str, ...] | list[str], prefix: str) -> None:
    for key in section.keys():
        if key not in known:
            raise ValueError(f"unknown config key `{prefix}{key}`{_near(key, known)}")


def load_presets(config_path: str) -> dict[str, dict[str, Any]]:
    """`PRESETS` of a config file (`configs/x.py[:arg]`): preset name → flat overrides."""
    path = config_path.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("_kexue_config_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(getattr(module, "PRESETS", {}))


def resolve_config(config: ml_collections.ConfigDict, presets: Mapping[str, Mapping[str, Any]],
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config with its preset applied: file defaults < `presets[config.preset]` < overrides.

    `overrides` are the command-line values (`--config.a.b=v`, flat `"a.b"` keys); they
    are applied again after the preset so that they always win.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    preset = config.get("preset", PRESET_FULL)
    if preset != PRESET_FULL:
        if preset not in presets:
            raise ValueError(f"config key `preset`: expected one of "
                             f"{[PRESET_FULL, *presets]}; got {preset!r}")
        config.update_from_flattened_dict(dict(presets[preset]))
        config.update_from_flattened_dict(dict(overrides))
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every key known and every value sensible, before anything is built or compiled.

    Raises:
      ValueError: naming the key (with the nearest valid key for a misspelling), what
        was expected and what was given.
    """
    _check_keys(config, TOP_KEYS, "")
    _check_finite(config.to_dict(), "")
    for key in ("data", "model", "optimizer", "train"):
        if key not in config:
            raise ValueError(f"the config needs a `{key}` section")
    _check_keys(config.data, list(default_data_config().keys()), "data.")
    task = config.data.get("task", "lm")
    if task not in TASK_KEYS:
        raise ValueError(f"config key `data.task`: expected one of {list(TASK_KEYS)}; "
                         f"got {task!r}")
    for section in ("objective", "eval"):
        _check_keys(config.get(section, {}), TASK_KEYS[task][section], f"{section}.")
    known_model = {*models.config.TRANSFORMER_KEYS, "name", "seq_len"}
    for keys in models.MODEL_KEYS.values():
        known_model |= set(keys)
    _check_keys(config.model, sorted(known_model), "model.")
    _check_keys(config.get("mesh", {}), MESH_AXES, "mesh.")
    _check_keys(config.train, [field.name for field in dataclasses.fields(LoopConfig)],
                "train.")
    _check_optimizer(config.optimizer)
    objective = config.get("objective", {})
    if task == "mlm" and objective.get("positions", "contiguous") not in POSITIONS:
        raise ValueError(f"config key `objective.positions`: expected one of "
                         f"{list(POSITIONS)}; got {objective.positions!r}")
    if task == "multilabel" and objective.get("loss", "zlpr") not in MULTILABEL_LOSSES:
        raise ValueError(f"config key `objective.loss`: expected one of "
                         f"{list(MULTILABEL_LOSSES)}; got {objective.loss!r}")
    if task == "ner":
        _check_rdrop(objective.get("rdrop_alpha", 0.0), config.model.get("name"))
    if task == "mlm" or (task == "lm" and "lengths" in config.get("eval", {})):
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
    train = LoopConfig.from_config(config.train)
    if train.best_metric and train.eval_every and train.checkpoint_every % train.eval_every:
        raise ValueError(f"config key `train.checkpoint_every`: expected a multiple of "
                         f"`train.eval_every` = {train.eval_every} (the best checkpoint is "
                         f"tracked at eval steps); got {train.checkpoint_every}")


def _check_finite(tree: Mapping[str, Any], prefix: str) -> None:
    """No setting is NaN or ±inf (`clip_norm=nan` would silently switch clipping off)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key `{prefix}{key}`: expected a finite number; "
                             f"got {value!r}")


def _check_rdrop(alpha: Any, model_name: Any) -> None:
    """`objective.rdrop_alpha`: a number ≥ 0, and > 0 only for GlobalPointer models."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0 \
            or not math.isfinite(alpha):
        raise ValueError(f"config key `objective.rdrop_alpha`: expected a finite number >= 0 "
                         f"(0: off); got {alpha!r}")
    if alpha > 0 and model_name != "global_pointer_ner":
        raise ValueError(f"config key `objective.rdrop_alpha`: R-Drop uses the GlobalPointer "
                         f"divergence, so it needs model.name='global_pointer_ner' (or "
                         f"rdrop_alpha=0); got rdrop_alpha={alpha!r} with model.name="
                         f"{model_name!r}")


def check_against_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The batch must split evenly over the data-parallel devices (and micro-batches).

    Raises:
      ValueError: naming `data.batch_size`, the mesh and the accumulation steps.
    """
    parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    accumulation = int(config.train.get("grad_accum_steps", 1) or 1)
    batch = int(config.data.batch_size)
    if batch % (parallel * accumulation):
        raise ValueError(
            f"config key `data.batch_size`: expected a multiple of mesh.data × mesh.fsdp × "
            f"train.grad_accum_steps = {mesh.shape.get('data', 1)} × "
            f"{mesh.shape.get('fsdp', 1)} × {accumulation} = {parallel * accumulation} "
            f"(each device gets whole examples); got {batch}")


def _check_optimizer(section: Any) -> None:
    _check_keys(section, ("name", "clip_norm", *OPTIMIZER_KEYS), "optimizer.")
    name = section.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"config key `optimizer.name`: expected one of {list(OPTIMIZERS)}; "
                         f"got {name!r}")
    for sub, keys in OPTIMIZER_KEYS.items():
        if sub in section:
            _check_keys(section[sub], keys, f"optimizer.{sub}.")
    sub = "amos" if name == "amos_factored" else name
    if sub not in section:
        raise ValueError(f"optimizer {name!r} needs the section `optimizer.{sub}`")
    rate = section[sub].get("learning_rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise ValueError(f"config key `optimizer.{sub}.learning_rate`: expected a positive "
                         f"number; got {rate!r}")
    clip = section.get("clip_norm", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0:
        raise ValueError(f"config key `optimizer.clip_norm`: expected a number >= 0 "
                         f"(0: off); got {clip!r}")
    if name == "adamw" and section.adamw.get("schedule", "cosine") not in ADAMW_SCHEDULES:
        raise ValueError(f"config key `optimizer.adamw.schedule`: expected one of "
                         f"{list(ADAMW_SCHEDULES)}; got {section.adamw.schedule!r}")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
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
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump(new, file, indent=2, sort_keys=True)
            file.write("\n")
        os.replace(path + ".tmp", path)
    return changed


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run saved in `workdir`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a "
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


# ----------------------------------------------------------------------------- optimizer


def _initial_params(model_factory: Callable[[], nnx.Module]) -> Any:
    with nnx.use_eager_sharding(False):
        model = model_factory()
    return nnx.as_pure(nnx.split(model, nnx.Param, ...)[1])


def build_optimizer(config: ml_collections.ConfigDict,
                    model_factory: Callable[[], nnx.Module]) -> optax.GradientTransformation:
    """The optax transformation `config.optimizer.name` names (η / σ read off the init)."""
    section = config.optimizer
    name = section.name
    num_steps = int(config.train.num_steps)
    if name == "adamw":
        c = section.adamw
        warmup = int(c.get("warmup_steps", 0))
        if c.get("schedule", "cosine") == "cosine":
            rate = optax.warmup_cosine_decay_schedule(
                0.0, c.learning_rate, max(warmup, 1), max(num_steps, warmup + 1))
        else:
            rate = optax.linear_schedule(0.0, c.learning_rate, max(warmup, 1))
        tx = optax.adamw(rate, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999),
                         eps=c.get("eps", 1e-8), weight_decay=c.get("weight_decay", 0.0))
    elif name in ("amos", "amos_factored"):
        c = section.amos
        eta_fn = optim.eta_fn_from_init(_initial_params(model_factory))
        tx = optim.amos(c.learning_rate, eta_fn,
                        optim.reduce_largest_axes() if name == "amos_factored" else None,
                        beta=c.get("beta", 0.999), zeta=c.get("zeta", 0.25),
                        momentum=c.get("momentum", None))
    else:
        c = section.amos_style
        base = c.get("base", "adam")
        base_kwargs = {"b1": c.get("b1", 0.9), "b2": c.get("b2", 0.999)} if base == "adam" else {}
        tx = optim.amos_style(
            c.learning_rate, base=base,
            sigma_fn=optim.eta_fn_from_init(_initial_params(model_factory)),
            half_life=c.get("half_life", max(num_steps // 2, 1)),
            kind=c.get("kind", "inverse_square"), q=c.get("q", 1.0),
            warmup_steps=c.get("warmup_steps", 0), base_kwargs=base_kwargs)
    clip = float(section.get("clip_norm", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


# ----------------------------------------------------------------------------- tasks


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by a `CausalLM`, decoded by `tokenizer`."""
    ids = np.asarray(tokenizer.encode(prompt), np.int32)[None, :]
    out = model.generate(jnp.asarray(ids), max_new_tokens=max_new_tokens)
    return tokenizer.decode(np.asarray(out[0, ids.shape[1]:]))


def print_sample(config: ml_collections.ConfigDict, model, tokenizer) -> None:
    """For LM configs with `eval.sample_tokens > 0`: print a greedy sample."""
    if config.data.task != "lm" or config.eval.get("sample_tokens", 0) <= 0:
        return
    prompt = config.eval.sample_prompt
    text = sample_text(model, tokenizer, prompt, int(config.eval.sample_tokens))
    print(f"sample (greedy) from {prompt!r}:\n{prompt}{text}", flush=True)


@dataclasses.dataclass
class Task:
    """Everything `train_loop` needs for one config, plus what the CLIs print.

    Attributes:
      config: the config with `model.vocab_size` (etc.) filled from the data.
      train_data: this process's training batches (checkpointable).
      eval_data: returns `[one stacked batch]` of the whole evaluation set.
      loss_fn: `(model, batch, rng) -> (loss, aux)` for training.
      eval_fn: `(model, stacked batch, rng) -> (loss, metrics)` over the set.
      model_factory: builds the model with its own `nnx.Rngs(config.seed)`.
      tokens_in: tokens of one host batch (for tokens/s).
    """

    config: ml_collections.ConfigDict
    train_data: DataIterator
    eval_data: Callable[[], list[Any]]
    loss_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    model_factory: Callable[[], nnx.Module]
    tokens_in: Callable[[Any], int]


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches `[B, ...]` → one `[B, K, ...]` batch (row-sharding stays on axis 0)."""
    if not batches:
        raise ValueError("the evaluation split gave no batches")
    return {key: np.stack([batch[key] for batch in batches], axis=1) for key in batches[0]}


def _scan_sums(stats: Callable[[nnx.Module, Any], dict[str, jax.Array]], model: nnx.Module,
               stacked: Any) -> dict[str, jax.Array]:
    """Σ over `k` of `stats(model, stacked[:, k])` with `lax.scan` (one batch in memory)."""
    graphdef, state = nnx.split(model)
    chunks = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), stacked)
    first = jax.tree.map(lambda x: x[0], chunks)
    shapes = jax.eval_shape(lambda: stats(nnx.merge(graphdef, state), first))

    def body(total, chunk):
        values = stats(nnx.merge(graphdef, state), chunk)
        return jax.tree.map(jnp.add, total, values), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    total, _ = jax.lax.scan(body, zeros, chunks)
    return total


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _metadata_into_model(config: ml_collections.ConfigDict, key: str, value: int) -> None:
    given = config.model.get(key)
    if given not in (None, 0, value):
        raise ValueError(f"config key `model.{key}`: the data gives {value}; got {given!r} "
                         "(leave it unset, it is filled from the data)")
    config.model[key] = value


def build_task(config: ml_collections.ConfigDict, mesh: Mesh) -> Task:
    """Data iterators, model factory and losses for `config.data.task`."""
    del mesh  # batches are placed by the train loop
    config = ml_collections.ConfigDict(config.to_dict())
    task = config.data.get("task", "lm")
    train_data = make_dataset(config, "train")
    meta = train_data.metadata
    _metadata_into_model(config, "vocab_size", meta.vocab_size)
    config.model.seq_len = meta.seq_len
    if task == "ner":
        _metadata_into_model(config, "num_types", meta.num_types)
    if task == "multilabel":
        _metadata_into_model(config, "num_classes", meta.num_types)
    models.parse_model_config(config)  # bad model values fail here, before any compile
    seed = int(config.get("seed", 0))

    def model_factory() -> nnx.Module:
        return models.build_model(config, rngs=nnx.Rngs(seed))

    builders = {"lm": _lm, "mlm": _mlm, "ner": _ner, "multilabel": _multilabel}
    loss_fn, eval_fn, groups, tokens_in = builders[task](config)
    cache: list[Any] = []

    def eval_data() -> list[Any]:
        if not cache:
            stacked = {name: _stack(list(make_dataset(config, "eval", seq_len=seq_len)))
                       for name, seq_len in groups.items()}
            cache.append(stacked)
        return cache

    return Task(config=config, train_data=train_data, eval_data=eval_data, loss_fn=loss_fn,
                eval_fn=eval_fn, model_factory=model_factory, tokens_in=tokens_in)


def _lm(config):
    """Next-token loss; eval at `data.seq_len` and at each of `eval.lengths` (optional).

    `eval/loss`, `bits_per_byte` and `tokens` are over `data.eval_batches` batches of
    windows of the training length, as without `eval.lengths`. The lengths are scored
    on one common text: the eval split is cut into windows of `L_max + 1` tokens
    (`L_max`: the largest length; `data.eval_batches` batches of them), and each is cut
    again into `L_max / L` windows of `L + 1` tokens overlapping by one, exactly the
    windows the pipeline makes at length `L`. So every length predicts the same target
    tokens, once each, and only the context they see differs. Per length: `loss_<L>`
    (nats/token), `bits_per_byte_<L>` (bits/token: bytes for the byte tokenizer),
    `perplexity_<L>`, `tokens_<L>` (targets scored) and the same over the tail, the
    target positions `j ≥ ⌊3L/4⌋` of each window (`loss_tail_<L>`,
    `bits_per_byte_tail_<L>`, `perplexity_tail_<L>`, `tokens_tail_<L>`): a window's
    average mixes in early positions with short contexts, while the tail is where a
    model trained at a shorter length has to extrapolate (kexue.fm/archives/8823).
    """
    lengths = tuple(int(n) for n in config.get("eval", {}).get("lengths", ()))
    longest = max(lengths, default=0)

    def stats(model, batch):
        tokens, weights = batch["tokens"], batch["weights"]
        logits = model(tokens[:, :-1])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        n = weights.shape[1]
        tail = weights * (jnp.arange(n) >= (3 * n) // 4)[None, :]
        return {"nll": jnp.sum(nll * weights), "tokens": jnp.sum(weights),
                "tail_nll": jnp.sum(nll * tail), "tail_tokens": jnp.sum(tail)}

    def loss_fn(model, batch, rng):
        del rng
        tokens = batch["tokens"]
        loss = models.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], batch["weights"])
        return loss, {"bits_per_byte": loss / math.log(2)}

    def eval_fn(model, batch, rng):
        del rng
        total = _scan_sums(stats, model, batch["eval"])
        loss = _ratio(total["nll"], total["tokens"])
        metrics = {"bits_per_byte": loss / math.log(2), "tokens": total["tokens"]}
        for length in lengths:
            total = _scan_sums(stats, model, _split_windows(batch["longest"], length))
            at = _ratio(total["nll"], total["tokens"])
            tail = _ratio(total["tail_nll"], total["tail_tokens"])
            metrics.update({
                f"loss_{length}": at, f"bits_per_byte_{length}": at / math.log(2),
                f"perplexity_{length}": jnp.exp(at), f"tokens_{length}": total["tokens"],
                f"loss_tail_{length}": tail, f"bits_per_byte_tail_{length}": tail / math.log(2),
                f"perplexity_tail_{length}": jnp.exp(tail),
                f"tokens_tail_{length}": total["tail_tokens"]})
        return loss, metrics

    groups: dict[str, int | None] = {"eval": None}
    if lengths:
        groups["longest"] = longest
    return loss_fn, eval_fn, groups, lambda batch: int(batch["weights"].size)


def _split_windows(stacked: dict[str, jax.Array], length: int) -> dict[str, jax.Array]:
    """Stacked LM windows `[B, K, N + 1]` → `[B, K·N/L, L + 1]`, the windows of length `L`.

    Window `j` of a long one holds its tokens `j·L … j·L + L` (overlapping the next by
    one, as the pipeline cuts them) and the weights of its targets `j·L … j·L + L − 1`.
    """
    tokens, weights = stacked["tokens"], stacked["weights"]
    b, k, n = weights.shape
    pieces = n // length
    inputs = tokens[:, :, :n].reshape(b, k, pieces, length)
    last = tokens[:, :, length::length].reshape(b, k, pieces, 1)  # next window's first
    tokens = jnp.concatenate([inputs, last], axis=-1)
    return {"tokens": tokens.reshape(b, k * pieces, length + 1),
            "weights": weights.reshape(b, k * pieces, length)}


def _mlm(config):
    positions_kind = config.get("objective", {}).get("positions", "contiguous")
    lengths = tuple(config.eval.lengths)

    def forward(model, batch, positions=None):
        return model(batch["tokens"], mask=batch["mask"], positions=positions)

    def loss_fn(model, batch, rng):
        positions = None
        if positions_kind == "random_equal_mean":
            # archive 9444: n ~ Exponential(mean N), positions linspace(0, 1, N) · n.
            b, n = batch["tokens"].shape
            span = jax.random.exponential(rng, (b, 1)) * n
            positions = jnp.linspace(0.0, 1.0, n)[None, :] * span
        if "predict_positions" in batch:  # data.mlm_max_predictions: head at those only
            where = batch["predict_positions"]
            logits = model(batch["tokens"], mask=batch["mask"], positions=positions,
                           predict_positions=where)
            labels = jnp.take_along_axis(batch["labels"], where, axis=1)
            weights = batch["predict_weights"]
        else:
            logits = forward(model, batch, positions)
            labels, weights = batch["labels"], batch["weights"]
        loss = models.cross_entropy(logits, labels, weights)
        correct = (jnp.argmax(logits, -1) == labels) * weights
        return loss, {"accuracy": _ratio(jnp.sum(correct), jnp.sum(weights))}

    def stats(model, batch):
        logits = forward(model, batch)
        weights = batch["weights"]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, batch["labels"][..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == batch["labels"]) * weights
        return {"nll": jnp.sum(nll * weights), "correct": jnp.sum(correct),
                "masked": jnp.sum(weights)}

    def eval_fn(model, batch, rng):
        del rng
        metrics = {}
        for length in lengths:
            total = _scan_sums(stats, model, batch[f"length_{length}"])
            metrics[f"loss_{length}"] = _ratio(total["nll"], total["masked"])
            metrics[f"accuracy_{length}"] = _ratio(total["correct"], total["masked"])
        return metrics[f"loss_{lengths[0]}"], metrics

    groups = {f"length_{length}": length for length in lengths}
    return loss_fn, eval_fn, groups, lambda batch: int(batch["tokens"].size)


def _span_labels(span_indices: jax.Array, types: int, n: int) -> jax.Array:
    """Dense 0/1 `[b, types, n, n]` from flat `type·n² + start·n + end` indices (−1: none)."""
    b = span_indices.shape[0]
    valid = span_indices >= 0
    flat = jnp.zeros((b, types * n * n), jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], span_indices.shape)
    flat = flat.at[rows, jnp.where(valid, span_indices, 0)].max(valid.astype(jnp.int32))
    return flat.reshape(b, types, n, n)


def _span_rows(span_indices: jax.Array, n: int) -> jax.Array:
    """`(type, start, end)` rows `[b, P, 3]` (−1 rows for padding) from flat indices."""
    kind, rest = span_indices // (n * n), span_indices % (n * n)
    rows = jnp.stack([kind, rest // n, rest % n], axis=-1)
    return jnp.where((span_indices >= 0)[..., None], rows, -1)


def _ner(config):
    """Span NER: GlobalPointer (ZLPR, optional R-Drop) or the BIO tagging baseline.

    Both report span `precision`, `recall`, `f1` from tp/fp/fn summed over the set
    (`ops.span_f1` against the gold spans). The BIO tagger trains on tags built from
    the gold spans (`models.bio_tags_from_spans`) and its arg-max tags are decoded to
    spans (`models.bio_span_scores`); `gold_spans` and `bio_unrepresentable` (gold
    spans the tags cannot hold: overlapping ones) are reported with it, and the
    unrepresentable spans stay in the gold set, so they count as misses.
    `objective.rdrop_alpha = α > 0` (GlobalPointer only): two dropout passes per step,
    `model.rdrop_loss` (kexue.fm/archives/8496, 9039).
    """
    sparse = config.model.get("gp_loss", "dense") == "sparse"
    types = int(config.model.num_types)
    bio = config.model.name == "bio_tagger"
    alpha = float(config.get("objective", {}).get("rdrop_alpha", 0.0))

    def labels_for(batch, n):
        if bio:
            return models.bio_tags_from_spans(_span_rows(batch["span_indices"], n), n)[0]
        if sparse:
            return _span_rows(batch["span_indices"], n)
        return _span_labels(batch["span_indices"], types, n)

    def loss_fn(model, batch, rng):
        del rng
        n = batch["tokens"].shape[1]
        logits = model(batch["tokens"], mask=batch["mask"])
        labels = labels_for(batch, n)
        if alpha > 0:  # a second pass: the module's dropout stream draws new masks
            again = model(batch["tokens"], mask=batch["mask"])
            return model.rdrop_loss(logits, again, labels, alpha=alpha, mask=batch["mask"])
        return model.loss(logits, labels, mask=batch["mask"]), {}

    def stats(model, batch):
        n = batch["tokens"].shape[1]
        logits = model(batch["tokens"], mask=batch["mask"])
        scores = model.span_scores(logits, mask=batch["mask"]) if bio else logits
        counts = ops.span_f1(scores, _span_labels(batch["span_indices"], types, n),
                             mask=batch["mask"])
        loss = model.loss(logits, labels_for(batch, n), mask=batch["mask"])
        rows = jnp.sum(batch["example_weights"])
        out = {"tp": counts["tp"], "fp": counts["fp"], "fn": counts["fn"],
               "loss_sum": loss * rows, "rows": rows}
        if bio:
            spans = _span_rows(batch["span_indices"], n)
            kept = models.bio_tags_from_spans(spans, n)[1]
            gold = jnp.sum(spans[..., 0] >= 0)
            out.update(gold_spans=gold, bio_unrepresentable=gold - jnp.sum(kept))
        return out

    def eval_fn(model, batch, rng):
        del rng
        total = _scan_sums(stats, model, batch["eval"])
        scores = ops.f1_from_counts(total["tp"], total["fp"], total["fn"])
        if bio:
            scores.update(gold_spans=total["gold_spans"],
                          bio_unrepresentable=total["bio_unrepresentable"])
        return _ratio(total["loss_sum"], total["rows"]), scores

    return loss_fn, eval_fn, {"eval": None}, lambda batch: int(np.sum(batch["mask"]))


def _multilabel(config):
    kind = config.get("objective", {}).get("loss", "zlpr")
    classes = int(config.model.num_classes)
    # `eval/f1_<type>`: F1 of each class over the set, named by its CLUENER type.
    names = (CLUENER_TYPES if len(CLUENER_TYPES) == classes
             else tuple(f"class{i}" for i in range(classes)))

    def loss_of(logits, labels, weights):
        if kind == "zlpr":
            per_example = ops.zlpr_loss(logits, labels.astype(jnp.float32))
        else:
            per_example = jnp.mean(optax.sigmoid_binary_cross_entropy(
                logits, labels.astype(jnp.float32)), axis=-1)
        return jnp.sum(per_example * weights), jnp.sum(weights)

    def loss_fn(model, batch, rng):
        del rng
        logits = model(batch["tokens"], mask=batch["mask"])
        total, rows = loss_of(logits, batch["type_labels"], batch["example_weights"])
        return _ratio(total, rows), {}

    def stats(model, batch):
        logits = model(batch["tokens"], mask=batch["mask"])
        weights = batch["example_weights"][:, None]
        predicted = (logits > 0) * weights  # ZLPR and sigmoid both decide at logit 0
        gold = (batch["type_labels"] > 0) * weights
        total, rows = loss_of(logits, batch["type_labels"], batch["example_weights"])
        return {"tp": jnp.sum(predicted * gold, 0), "fp": jnp.sum(predicted * (1 - gold), 0),
                "fn": jnp.sum((1 - predicted) * gold, 0), "loss_sum": total, "rows": rows}

    def eval_fn(model, batch, rng):
        del rng
        total = _scan_sums(stats, model, batch["eval"])
        micro = ops.f1_from_counts(*(jnp.sum(total[c]) for c in ("tp", "fp", "fn")))
        per_class = ops.f1_from_counts(total["tp"], total["fp"], total["fn"])["f1"]
        return _ratio(total["loss_sum"], total["rows"]), {
            "micro_f1": micro["f1"], "micro_precision": micro["precision"],
            "micro_recall": micro["recall"], "macro_f1": jnp.sum(per_class) / classes,
            **{f"f1_{name}": per_class[i] for i, name in enumerate(names)}}

    return loss_fn, eval_fn, {"eval": None}, lambda batch: int(np.sum(batch["mask"]))
