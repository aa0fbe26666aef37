"""RoFormer MLM trained at length 64, evaluated at 64 … 1024 (SPEC §3, kexue.fm/archives/8823).

    python -m experiments.train --config configs/mlm_extrapolation.py --workdir runs/mlm_e \\
        --config.model.attention_scale=entropy_invariant \\
        --config.objective.positions=random_equal_mean

Switches:
  * `model.attention_scale`: "standard" (`1/√d`) or "entropy_invariant"
    (`log_512(n)/√d`, archive 8823);
  * `objective.positions`: "contiguous" (`0 … N−1`) or "random_equal_mean" (archive
    9444: `n ~ Exponential(mean N)`, positions `linspace(0, 1, N)·n`, floats into RoPE).

Masked-token accuracy is reported for every length in `eval.lengths`
(`eval/accuracy_<length>`); the SPEC's claim is that entropy-invariant attention
keeps more of it beyond the training length. Byte-level text of the stdlib (offline);
`data.name` may name any other text corpus.
"""

import ml_collections

from experiments._build import optimizer_config
from kexue.data import default_data_config

PRESETS = {
    "smoke": {
        "model.width": 32, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_dim": 64,
        "data.batch_size": 8, "data.eval_batches": 1,
        "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 4,
        "train.checkpoint_every": 4, "eval.lengths": (64, 128),
    },
}


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0

    config.data = default_data_config()
    config.data.name = "text_files"
    config.data.task = "mlm"
    config.data.tokenizer = "byte"
    config.data.seq_len = 64  # the training length
    config.data.batch_size = 64
    config.data.eval_batches = 4  # per evaluation length
    config.data.mlm_probability = 0.15
    # > 0 (e.g. 20 at length 64): at most that many chosen per window, and the MLM head
    # runs at those positions only (worth it with a large vocabulary; 0: every position).
    config.data.mlm_max_predictions = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "roformer_mlm"
    config.model.width = 256
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 1024
    config.model.norm_position = "post"
    config.model.attention_scale = "entropy_invariant"  # or "standard"
    config.model.entropy_base = 512.0
    config.model.tie_embeddings = True

    config.optimizer = optimizer_config("amos_style", learning_rate=0.01, half_life=2000)

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 5000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 2
    config.train.best_metric = "accuracy_64"
    config.train.best_mode = "max"
    config.train.seed = 0

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.objective = ml_collections.ConfigDict()
    config.objective.positions = "contiguous"  # or "random_equal_mean"
    config.eval = ml_collections.ConfigDict()
    config.eval.lengths = (64, 128, 256, 512, 1024)
    return config
