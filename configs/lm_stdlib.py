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

from experiments._build import optimizer_config
from kexue.data import default_data_config

PRESETS = {
    # A few seconds on CPU: for tests and for checking a setup.
    "smoke": {
        "model.width": 32, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_dim": 64,
        "data.seq_len": 32, "data.batch_size": 8, "data.eval_batches": 2,
        "train.num_steps": 8, "train.log_every": 2, "train.eval_every": 4,
        "train.checkpoint_every": 4, "eval.sample_tokens": 16,
    },
}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0

    config.data = default_data_config()
    config.data.name = "text_files"
    config.data.task = "lm"
    config.data.tokenizer = "byte"
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.data.eval_batches = 8  # 8 x 16 windows of 128 bytes of held-out files

    config.model = ml_collections.ConfigDict()
    config.model.name = "causal_lm"
    config.model.width = 256
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 1024
    config.model.activation = "gelu"
    config.model.norm = "rmsnorm"
    config.model.attention_scale = "entropy_invariant"
    config.model.entropy_base = 512.0
    config.model.rope_layout = "half"
    config.model.tie_embeddings = True
    config.model.dtype = "float32"  # "bfloat16" on GPU/TPU
    config.model.remat = "none"  # "full" | "dots" | "dots_no_batch": memory for recompute
    # None (per backend: blocked on CPU from ops.attention.CPU_BLOCKED_MIN_KEYS keys on)
    # | "blocked" | "xla" | "cudnn" (NVIDIA GPUs, with dtype bfloat16)
    config.model.attention_implementation = ml_collections.config_dict.placeholder(str)

    config.optimizer = optimizer_config("amos", learning_rate=0.1)

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 400
    config.train.log_every = 20
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 2
    config.train.best_metric = "loss"
    config.train.best_mode = "min"
    config.train.seed = 0

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.objective = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict()
    config.eval.sample_prompt = "def "
    config.eval.sample_tokens = 160
    return config
