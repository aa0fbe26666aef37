"""Causal byte-level LM on the Python standard library: the default job of `make run`.

    python -m experiments.train --config configs/lm_stdlib.py --workdir runs/lm_stdlib
    python -m experiments.train --config configs/lm_stdlib.py --workdir /tmp/s \\
        --config.preset=smoke                      # or: --config configs/lm_stdlib.py:smoke

The corpus is every `.py` file of the interpreter's standard library (data name
`text_files`, no download); about 5% of the files, chosen by a hash of their path, are
held out, and the eval loss is reported in bits per byte. The model is a pre-norm
RoPE decoder with entropy-invariant attention (kexue.fm/archives/8823) trained by
Amos (arXiv 2210.11693, η read off the init): in a 150-step comparison on this
config (eval loss, nats/byte) Amos at ξ=0.1 reached 3.10, AdamW at 3e-3 (cosine)
3.21 and the Amos-style Adam chain (archive 9344) at α₀=0.03 3.28; switch with
`--config.optimizer.name=amos_style|adamw|amos_factored`. Sized to finish in a few
minutes on two CPU cores; raise `model.*`, `data.*` and `train.num_steps` on an
accelerator.
"""

import ml_collections

from configs.common import (
    BYTE_LM_SMOKE,
    byte_lm_model_config,
    data_config,
    mesh_config,
    optimizer_config,
    train_config,
    with_preset,
)

PRESETS = {"smoke": BYTE_LM_SMOKE}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Every .py file of the standard library; 8 x 16 windows of 128 bytes of the
    # held-out files per evaluation.
    config.data = data_config(name="text_files", task="lm", tokenizer="byte", seq_len=128,
                              batch_size=16, eval_batches=8)

    # model.dtype "bfloat16" on GPU/TPU; model.remat "full" | "dots" | "dots_no_batch"
    # trades recompute for memory; model.attention_implementation None (per backend:
    # blocked on CPU from ops.attention.CPU_BLOCKED_MIN_KEYS keys on) | "blocked" | "xla"
    # | "cudnn" (NVIDIA GPUs, with dtype bfloat16).
    config.model = byte_lm_model_config(
        attention_implementation=ml_collections.config_dict.placeholder(str))

    config.optimizer = optimizer_config("amos", learning_rate=0.1)
    config.train = train_config(400, log_every=20, eval_every=100, checkpoint_every=100,
                                keep_checkpoints=2, best_metric="loss", best_mode="min")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict({"sample_prompt": "def ", "sample_tokens": 160})
    return with_preset(config, PRESETS, preset)
