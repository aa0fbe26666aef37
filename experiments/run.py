"""From a checked config to the parts of a training run, and the run itself.

    config = experiments.config.load("configs/lm_stdlib.py", preset="smoke")
    experiments.config.check(config)
    run = build(config)                  # mesh, data, model spec, task, optimizer
    result = train(run, workdir)         # kexue.train.train_loop with all of it

The one place where config keys become the library's typed arguments: `data` →
`kexue.data.DataConfig`, `model` (plus the vocabulary and type counts the data
reports) → `kexue.models.ModelSpec`, `data.task` with `objective` and `eval` → a
`kexue.tasks` task, `optimizer` → `kexue.optim.make_optimizer`, `train` →
`kexue.train.LoopConfig`, `mesh` → `kexue.parallel.make_mesh`. Errors name the
config key.

With `model.init_from`, `build` reads the checkpoint (`kexue.models.load_pretrained`,
every tensor checked; the MLM head is not needed and is reported unused with the
rest) and takes the encoder's architecture from it; `train` sets the encoder's
weights after the train state is created (`kexue.train.create_train_state(...,
init_params=)`), only when the run starts from step 0: a run resumed from its own
checkpoints keeps their weights. The task head keeps its own initialisation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from experiments.config import config_keys, data_settings, model_settings
from kexue import models, optim, saved, tasks
from kexue.data import DataConfig, DataIterator, DatasetMetadata, make_dataset
from kexue.parallel import make_mesh
from kexue.train import LoopConfig, TrainResult, cpu_compiler_options, train_loop

__all__ = ["Run", "build", "check_against_mesh", "init_from_pretrained", "learning_rate",
           "make_task", "mesh_from", "model_spec", "optimizer", "pretrained_checkpoint",
           "print_sample", "prompt_ids", "sample_text", "save_model_info", "stream_text",
           "train"]


def mesh_from(config: ml_collections.ConfigDict) -> Mesh:
    """The `(data, fsdp, tensor)` mesh of `config.mesh` over all devices."""
    section = config.get("mesh", {})
    sizes = {"data": section.get("data", -1), "fsdp": section.get("fsdp", 1),
             "tensor": section.get("tensor", 1)}
    try:
        return make_mesh(**sizes)
    except ValueError as error:
        given = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
        raise ValueError(f"config `mesh` ({given}) does not fit the {len(jax.devices())} "
                         f"devices: {error}") from error


def check_against_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The batch must split evenly over the data-parallel devices (and micro-batches)."""
    parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    accumulation = int(config.train.get("grad_accum_steps", 1) or 1)
    batch = int(config.data.batch_size)
    if batch % (parallel * accumulation):
        raise ValueError(
            f"config key `data.batch_size`: expected a multiple of mesh.data × mesh.fsdp × "
            f"train.grad_accum_steps = {mesh.shape.get('data', 1)} × "
            f"{mesh.shape.get('fsdp', 1)} × {accumulation} = {parallel * accumulation} "
            f"(each device gets whole examples); got {batch}")


def _filled(settings: dict[str, Any], key: str, value: int) -> None:
    given = settings.get(key)
    if given not in (None, 0, value):
        raise ValueError(f"config key `model.{key}`: the data gives {value}; got {given!r} "
                         "(leave it unset, it is filled from the data)")
    settings[key] = value


def pretrained_checkpoint(config: ml_collections.ConfigDict
                          ) -> models.PretrainedCheckpoint | None:
    """The checkpoint of `config.model.init_from` (encoder only), or None without one."""
    path = config.model.get("init_from")
    if path is None:
        return None
    try:
        return models.load_pretrained(path, head=False)
    except (OSError, ImportError, ValueError) as error:
        raise ValueError(f"config key `model.init_from`: {error}") from error


def _from_checkpoint(settings: dict[str, Any], checkpoint: models.PretrainedCheckpoint,
                     metadata: DatasetMetadata, vocab_file: str | None) -> dict[str, Any]:
    """`settings` with the encoder's architecture of `checkpoint` (set keys must agree)."""
    fields = [field.name for field in dataclasses.fields(models.TransformerConfig)]
    if metadata.vocab_size != checkpoint.config.vocab_size:
        raise ValueError(f"config key `data.vocab_file`: {vocab_file} has "
                         f"{metadata.vocab_size} tokens; the checkpoint {checkpoint.path} "
                         f"has vocab_size {checkpoint.config.vocab_size}")
    given = {key: value for key, value in settings.items() if key in fields}
    with config_keys("model", {"overrides": "init_from"}):
        encoder = models.merge_pretrained_config(checkpoint.config, given)
    return {**{key: value for key, value in settings.items() if key not in fields},
            **dataclasses.asdict(encoder)}


def model_spec(config: ml_collections.ConfigDict, metadata: DatasetMetadata,
               checkpoint: models.PretrainedCheckpoint | None = None) -> models.ModelSpec:
    """`config.model` with the vocabulary (and type / class count) the data reports;
    with `checkpoint`, the encoder's architecture is the checkpoint's."""
    settings = model_settings(config)
    if checkpoint is not None:
        settings = _from_checkpoint(settings, checkpoint, metadata,
                                    data_settings(config).get("vocab_file"))
    _filled(settings, "vocab_size", metadata.vocab_size)
    if config.data.task == "ner":
        _filled(settings, "num_types", metadata.num_types)
    if config.data.task == "multilabel":
        _filled(settings, "num_classes", metadata.num_types)
    with config_keys("model"):
        spec = models.ModelSpec.from_settings(settings)
    with config_keys("model", {arg: spec.setting_of(arg) for arg in spec.options}):
        nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
    return spec


def make_task(config: ml_collections.ConfigDict, metadata: DatasetMetadata) -> tasks.Task:
    """The `kexue.tasks` task of `config.data.task`, with `objective` and `eval`."""
    task = config.data.task
    objective, evaluation = config.get("objective", {}), config.get("eval", {})
    if task == "lm":
        return tasks.LMTask(eval_lengths=tuple(evaluation.get("lengths", ())))
    if task == "mlm":
        return tasks.MLMTask(eval_lengths=tuple(evaluation.lengths),
                             positions=objective.get("positions", "contiguous"))
    if task == "ner":
        return tasks.NERTask(num_types=metadata.num_types,
                             rdrop_alpha=float(objective.get("rdrop_alpha", 0.0)))
    names = metadata.type_names if len(metadata.type_names) == metadata.num_types else None
    return tasks.MultiLabelTask(num_classes=metadata.num_types,
                                loss_kind=objective.get("loss", "zlpr"), class_names=names)


@dataclasses.dataclass
class Run:
    """Everything `kexue.train.train_loop` needs for one checked config.

    Attributes:
      config: the config.
      mesh: the device mesh.
      data: the data settings.
      train_data: this process's training batches (checkpointable).
      spec: the model.
      task: the training task.
      loop: the training-loop settings.
      tx: the optimizer.
      pretrained: the checkpoint of `model.init_from` (None: random init).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    data: DataConfig
    train_data: DataIterator
    spec: models.ModelSpec
    task: tasks.Task
    loop: LoopConfig
    tx: optax.GradientTransformation
    pretrained: models.PretrainedCheckpoint | None = None

    def model_factory(self) -> nnx.Module:
        """The model with its own `nnx.Rngs(config.seed)`."""
        return models.build_model(self.spec, rngs=nnx.Rngs(int(self.config.get("seed", 0))))

    def eval_data(self) -> Iterator[tuple[str, Any]]:
        """`(stream, host batch)` of one evaluation, read afresh (nothing is cached)."""
        return tasks.eval_batches(
            self.task, lambda seq_len: make_dataset(self.data, "eval", seq_len=seq_len))

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        return cpu_compiler_options(self.mesh, remat=self.spec.transformer.remat != "none")


def learning_rate(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The global rate of `config.optimizer` by update count (`optim.learning_rate_schedule`)."""
    name = config.optimizer.name
    section = "amos" if name == "amos_factored" else name
    with config_keys(f"optimizer.{section}"):
        return optim.learning_rate_schedule(name, config.optimizer[section].to_dict(),
                                            num_steps=num_steps)


def optimizer(config: ml_collections.ConfigDict, model_factory: Callable[[], nnx.Module],
              num_steps: int) -> optax.GradientTransformation:
    """`config.optimizer` as an Optax transformation (η / σ read off the init)."""
    section = config.optimizer
    name = section.name
    settings = section["amos" if name == "amos_factored" else name].to_dict()
    initial = None if name == "adamw" else models.initial_params(model_factory)
    with config_keys(f"optimizer.{'amos' if name == 'amos_factored' else name}"):
        return optim.make_optimizer(name, settings, num_steps=num_steps,
                                    initial_params=initial,
                                    clip_norm=float(section.get("clip_norm", 0.0)))


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """The run of a config that passed `experiments.config.check`."""
    mesh = mesh_from(config) if mesh is None else mesh
    check_against_mesh(config, mesh)
    checkpoint = pretrained_checkpoint(config)
    with config_keys("data"):
        data = DataConfig.from_settings(data_settings(config))
    with config_keys("data"):
        train_data = make_dataset(data, "train")
        make_dataset(data, "eval")  # a missing held-out split fails here, before step 1
    spec = model_spec(config, train_data.metadata, checkpoint)
    task = make_task(config, train_data.metadata)
    loop = LoopConfig.from_settings(config.train)
    run = Run(config=config, mesh=mesh, data=data, train_data=train_data, spec=spec,
              task=task, loop=loop, tx=optax.identity(), pretrained=checkpoint)
    run.tx = optimizer(config, run.model_factory, loop.num_steps)
    return run


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def init_from_pretrained(checkpoint: models.PretrainedCheckpoint,
                         log: Callable[[str], None] = _print) -> Callable[[nnx.Module], None]:
    """The `init_params` hook that sets a model's encoder from `checkpoint` and logs
    what it set, what it left at the initialisation and what the model does not use."""

    def init_params(model: nnx.Module) -> None:
        left = models.load_pretrained_params(model, checkpoint)
        unused = ", ".join(checkpoint.unused) or "none"
        c = checkpoint.config
        log(f"model.init_from: {len(checkpoint.params)} encoder tensors from "
            f"{checkpoint.path} ({checkpoint.architecture}, {checkpoint.format}, width "
            f"{c.width}, {c.num_layers} layers, {c.num_heads} heads); left at "
            f"their initialisation: {', '.join(left) or 'none'}; checkpoint tensors not "
            f"used: {unused}")

    return init_params


def train(run: Run, workdir: str | os.PathLike, *,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """`kexue.train.train_loop` on `run` in `workdir` (resumes from its checkpoints; a
    run that starts from step 0 sets the encoder from `run.pretrained`).

    First writes `<workdir>/model.json` and the tokenizer's vocabulary
    (`kexue.saved.save_model_info`), which `kexue.load` reads back.
    """
    save_model_info(run, workdir)
    extra = {} if log is None else {"log": log}
    init_params = (None if run.pretrained is None
                   else init_from_pretrained(run.pretrained, log or _print))
    return train_loop(model_factory=run.model_factory, loss_fn=run.task.loss, tx=run.tx,
                      train_data=run.train_data, mesh=run.mesh, config=run.loop,
                      workdir=os.fspath(workdir), eval_data=run.eval_data,
                      eval_stats=run.task.eval_stats, finalize=run.task.finalize,
                      tokens_in=run.task.tokens_in, compiler_options=run.compiler_options,
                      init_params=init_params,
                      learning_rate=learning_rate(run.config, run.loop.num_steps), **extra)


def save_model_info(run: Run, workdir: str | os.PathLike) -> None:
    """What `kexue.load` needs to rebuild the model of `run` (see `kexue.saved`)."""
    metadata = run.train_data.metadata
    names = (run.task.class_names if isinstance(run.task, tasks.MultiLabelTask)
             else metadata.type_names)
    saved.save_model_info(workdir, spec=run.spec, kind=run.data.task, task=run.task,
                          tokenizer=run.train_data.tokenizer, seq_len=run.data.seq_len,
                          type_names=tuple(names), data=dataclasses.asdict(run.data))


def prompt_ids(tokenizer: Any, prompt: str) -> np.ndarray:
    """int32 `[1, n]`: the tokens of `prompt`; an empty prompt is `<eos>` alone (the
    separator before every training document, so the model starts a new one)."""
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if ids.size == 0:
        ids = np.array([tokenizer.eos_id], np.int32)
    return ids[None, :]


def stream_text(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int,
                rng: jax.Array | None = None, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None) -> Iterator[str]:
    """The continuation of `prompt` by a `CausalLM`, as text pieces while it is drawn.

    Tokens come from `model.stream` (same arguments); generation stops at `<eos>`
    (the end of a training document). A piece is yielded once it decodes to whole
    characters (a byte tokenizer may need several bytes for one), so the pieces
    joined are the decoded continuation.
    """
    ids: list[int] = []
    shown = ""
    tokens = model.stream(jnp.asarray(prompt_ids(tokenizer, prompt)),
                          max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                          top_k=top_k, top_p=top_p)
    for token in tokens:
        token = int(np.asarray(token)[0])
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids).rstrip("\ufffd")  # an incomplete character waits
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)
    if text != shown:
        yield text[len(shown):] if text.startswith(shown) else text


def sample_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by a `CausalLM`, decoded by `tokenizer`."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens))


def print_sample(config: ml_collections.ConfigDict, model: Any, tokenizer: Any) -> None:
    """For LM configs with `eval.sample_tokens > 0`: print a greedy sample as it comes."""
    if config.data.task != "lm" or config.eval.get("sample_tokens", 0) <= 0:
        return
    prompt = config.eval.sample_prompt
    print(f"sample (greedy) from {prompt!r}:\n{prompt}", end="", flush=True)
    for piece in stream_text(model, tokenizer, prompt,
                             max_new_tokens=int(config.eval.sample_tokens)):
        print(piece, end="", flush=True)
    print(flush=True)
