"""Sections shared by the config files, built from the library's own defaults.

    def get_config(preset: str = "full") -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict()
        config.data = data_config(name="cluener", task="ner", tokenizer="char")
        config.optimizer = optimizer_config("amos_style", learning_rate=0.01)
        ...
        return with_preset(config, PRESETS, preset)

Every default comes from the library (`kexue.data.DataConfig`,
`kexue.optim.optimizer_defaults`, `kexue.train.LoopConfig`), so a config section
cannot drift from what the code does when a key is left out. `with_preset` applies a
named preset (`configs/x.py:smoke` on the command line calls `get_config("smoke")`);
command-line overrides (`--config.a.b=v`) are applied after it by `config_flags`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from kexue.data import DataConfig, default_cluener_dir
from kexue.optim import OPTIMIZERS, optimizer_defaults
from kexue.train import LoopConfig

#: The preset every config file has: its own values, unchanged.
PRESET_FULL = "full"


def with_preset(config: ml_collections.ConfigDict, presets: Mapping[str, Mapping[str, Any]],
                preset: str) -> ml_collections.ConfigDict:
    """`config` with `presets[preset]` (flat "section.key" values) applied; records
    the name in `config.preset`.

    Raises:
      ValueError: an unknown preset, naming the known ones.
    """
    if preset != PRESET_FULL and preset not in presets:
        raise ValueError(f"config key `preset`: expected one of {[PRESET_FULL, *presets]}; "
                         f"got {preset!r}")
    config.preset = preset
    if preset != PRESET_FULL:
        config.update_from_flattened_dict(dict(presets[preset]))
    return config


def _section(values: Mapping[str, Any], optional: set[str]) -> ml_collections.ConfigDict:
    """A section whose None-valued optional strings accept a value from the command line."""
    return ml_collections.ConfigDict({
        key: ml_collections.config_dict.placeholder(str)
        if value is None and key in optional else value for key, value in values.items()})


def data_config(**fields: Any) -> ml_collections.ConfigDict:
    """The `data` section: every `kexue.data.DataConfig` field, `fields` over defaults."""
    values = dataclasses.asdict(DataConfig(**fields))
    optional = {field.name for field in dataclasses.fields(DataConfig)
                if field.type == "str | None"}
    return _section(values, optional)


def optimizer_config(name: str, **chosen: Any) -> ml_collections.ConfigDict:
    """The `optimizer` section: `name`, `clip_norm` and every optimizer's settings.

    `chosen` settings go to the section of `name` (`amos_factored` shares `amos`'s),
    the other sections keep the defaults, so `--config.optimizer.name=adamw` switches
    to a sane AdamW.
    """
    sections = {key: optimizer_defaults(key) for key in OPTIMIZERS if key != "amos_factored"}
    target = sections["amos" if name == "amos_factored" else name]
    unknown = sorted(set(chosen) - set(target))
    if unknown:
        raise ValueError(f"optimizer {name!r} has no setting {unknown}; expected keys among "
                         f"{sorted(target)}")
    target.update(chosen)
    return ml_collections.ConfigDict({"name": name, "clip_norm": 0.0, **sections})


def train_config(num_steps: int, **fields: Any) -> ml_collections.ConfigDict:
    """The `train` section: every `kexue.train.LoopConfig` field, `fields` over defaults."""
    return _section(dataclasses.asdict(LoopConfig(num_steps=num_steps, **fields)),
                    {"best_metric"})


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """The `mesh` section: sizes of the `(data, fsdp, tensor)` axes (one may be -1)."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def cluener_data_config(**fields: Any) -> ml_collections.ConfigDict:
    """The `data` section of the character-level CLUENER 2020 tasks (sentences are at
    most 50 characters; length 64, batch 32), read from `default_cluener_dir()` when
    the project's copy is present, else downloaded."""
    return data_config(**{"name": "cluener", "tokenizer": "char",
                          "manual_dir": default_cluener_dir(), "seq_len": 64,
                          "batch_size": 32, **fields})


def cluener_encoder_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
    """The `model` section of the CLUENER tasks: model `name` on a character-level
    post-norm RoFormer encoder (width 256, 4 layers, 4 heads, dropout 0.1), `fields`
    on top (the head's own settings). `init_from` (unset) takes the encoder from a
    pretrained BERT / RoFormer checkpoint (see `CLUENER_FINETUNE`)."""
    return ml_collections.ConfigDict({
        "name": name, "init_from": ml_collections.config_dict.placeholder(str),
        "width": 256, "num_layers": 4, "num_heads": 4, "mlp_dim": 1024,
        "norm_position": "post", "dropout_rate": 0.1, **fields})


def cluener_train_config(best_metric: str) -> ml_collections.ConfigDict:
    """The `train` section of the CLUENER tasks: 3000 steps, evaluated and saved every
    500, the best checkpoint by `best_metric` (higher is better) kept."""
    return train_config(3000, log_every=50, eval_every=500, checkpoint_every=500,
                        keep_checkpoints=2, best_metric=best_metric, best_mode="max")


#: Sentences in CLUENER 2020's training split.
CLUENER_TRAIN_SENTENCES = 10_748
#: The fine-tuning batch and epochs of bojone/GlobalPointer's CLUENER_GlobalPointer.py.
FINETUNE_BATCH, FINETUNE_EPOCHS = 16, 10
#: Steps of one pass over the training split at that batch: ⌈10 748 / 16⌉ = 672
#: (the stream repeats without a remainder, so a "pass" is 10 752 sentences).
FINETUNE_EPOCH_STEPS = math.ceil(CLUENER_TRAIN_SENTENCES / FINETUNE_BATCH)


def cluener_finetune_preset(best_metric: str) -> dict[str, Any]:
    """The `finetune` preset of the CLUENER configs: a pretrained encoder tuned as in
    bojone/GlobalPointer (CLUENER_GlobalPointer.py, kexue.fm/archives/8373).

    That script fine-tunes BERT-base (`chinese_L-12_H-768_A-12`) with Adam (learning
    rate 2e-5 for every weight, β = (0.9, 0.999), ε = 1e-6, no weight decay, no
    schedule), batch 16, 10 epochs, evaluating on dev after each epoch and keeping the
    weights of the best F1. Here: `optimizer.adamw` with those settings (constant rate,
    no warm-up), `data.batch_size` 16,
    `train.num_steps` = 10 × 672 = 6720 (672 = ⌈10 748 / 16⌉ steps per pass over the
    training split), evaluation and a checkpoint every 672 steps, the best by
    `best_metric` kept. Sentences are WordPiece tokens `[CLS] … [SEP]` of the
    checkpoint's vocab.txt (CLUENER sentences have at most 50 characters, so
    `seq_len` 64 holds them whole; the script's 256 only pads more). The encoder's
    architecture keys are left unset: `model.init_from` fills them.
    """
    return {
        "data.tokenizer": "wordpiece", "data.batch_size": FINETUNE_BATCH,
        **{f"model.{key}": ml_collections.config_dict.placeholder(int)
           for key in ("width", "num_layers", "num_heads", "mlp_dim")},
        "model.norm_position": ml_collections.config_dict.placeholder(str),
        "optimizer.name": "adamw", "optimizer.adamw.learning_rate": 2e-5,
        "optimizer.adamw.b1": 0.9, "optimizer.adamw.b2": 0.999, "optimizer.adamw.eps": 1e-6,
        "optimizer.adamw.weight_decay": 0.0, "optimizer.adamw.warmup_steps": 0,
        "optimizer.adamw.schedule": "constant",
        "train.num_steps": FINETUNE_EPOCHS * FINETUNE_EPOCH_STEPS,
        "train.eval_every": FINETUNE_EPOCH_STEPS,
        "train.checkpoint_every": FINETUNE_EPOCH_STEPS, "train.best_metric": best_metric,
        "train.best_mode": "max",
    }


#: The byte-level LM configs' "smoke" preset: a few seconds on CPU (after a first build
#: or download of the data), for tests and for checking a setup.
BYTE_LM_SMOKE: dict[str, Any] = {
    "model.width": 32, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_dim": 64,
    "data.seq_len": 32, "data.batch_size": 8, "data.eval_batches": 2,
    "train.num_steps": 8, "train.log_every": 2, "train.eval_every": 4,
    "train.checkpoint_every": 4, "eval.sample_tokens": 16,
}


def byte_lm_model_config(**fields: Any) -> ml_collections.ConfigDict:
    """The `model` section of the byte-level causal LMs: a pre-norm RoPE decoder (width
    256, 4 layers, RMSNorm, NeoX RoPE, tied embeddings) with entropy-invariant attention
    (kexue.fm/archives/8823), `fields` on top."""
    return ml_collections.ConfigDict({
        "name": "causal_lm", "width": 256, "num_layers": 4, "num_heads": 4,
        "mlp_dim": 1024, "activation": "gelu", "norm": "rmsnorm",
        "attention_scale": "entropy_invariant", "entropy_base": 512.0,
        "rope_layout": "half", "tie_embeddings": True, "dtype": "float32",
        "remat": "none", **fields})
