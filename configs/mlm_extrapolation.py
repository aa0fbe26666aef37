"""RoFormer MLM trained at length 64, evaluated at 64 … 1024 (kexue.fm/archives/8823).

    python -m experiments.train --config configs/mlm_extrapolation.py --workdir runs/mlm_e \\
        --config.model.attention_scale=entropy_invariant \\
        --config.objective.positions=random_equal_mean

Switches:
  * `model.attention_scale`: "standard" (`1/√d`) or "entropy_invariant"
    (`log_512(n)/√d`, archive 8823);
  * `objective.positions`: "contiguous" (`0 … N−1`) or "random_equal_mean" (archive
    9444: `n ~ Exponential(mean N)`, positions `linspace(0, 1, N)·n`, floats into RoPE).

Masked-token accuracy is reported for every length in `eval.lengths`
(`eval/accuracy_<length>`); the claim of archive 8823 is that entropy-invariant attention
keeps more of it beyond the training length. Byte-level text of the stdlib (offline);
`data.name` may name any other text corpus.
"""

import ml_collections

from configs.common import data_config, mesh_config, optimizer_config, train_config, with_preset

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
    config.seed = 0
    # Trained at length 64; `eval_batches` batches per evaluation length.
    # `mlm_max_predictions` > 0 (e.g. 20 at length 64): at most that many chosen per
    # window, and the MLM head runs at those positions only (worth it with a large
    # vocabulary; 0: every position).
    config.data = data_config(name="text_files", task="mlm", tokenizer="byte", seq_len=64,
                              batch_size=64, eval_batches=4, mlm_probability=0.15,
                              mlm_max_predictions=0)

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
    config.train = train_config(5000, log_every=50, eval_every=500, checkpoint_every=500,
                                keep_checkpoints=2, best_metric="accuracy_64",
                                best_mode="max")
    config.mesh = mesh_config()
    config.objective = ml_collections.ConfigDict()
    config.objective.positions = "contiguous"  # or "random_equal_mean"
    config.eval = ml_collections.ConfigDict()
    config.eval.lengths = (64, 128, 256, 512, 1024)
    return with_preset(config, PRESETS, preset)
