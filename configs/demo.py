"""Default config of `make run`: a tour of kexue's ops and optimizers on CPU.

    python -m experiments.demo --config configs/demo.py [--config.zlpr.steps=500]

Three measurements, each computed when the command runs:
  * RoPE's long-range decay (kexue.fm/archives/8265): mean |<R_m q, R_n k>| of
    all-ones vectors as the distance n - m grows;
  * attention entropy versus the number of keys for standard and entropy-invariant
    scaling (kexue.fm/archives/8823);
  * a multi-label linear classifier trained with the ZLPR loss (archive 7359) by Amos
    and by an Amos-style Adam chain, decoded at the ZLPR threshold 0, scored by
    micro-F1 on held-out data.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.rope = ml_collections.ConfigDict()
    config.rope.head_dim = 128
    config.rope.base = 10000.0
    config.rope.distances = (0, 1, 4, 16, 64, 256, 1024, 4096)

    config.entropy = ml_collections.ConfigDict()
    config.entropy.head_dim = 64
    config.entropy.entropy_base = 512.0
    config.entropy.key_counts = (64, 128, 256, 512, 1024, 2048, 4096)
    config.entropy.num_queries = 256
    # Queries are scaled up (logits of std ~2) so attention is peaked as in a trained
    # model rather than nearly uniform.
    config.entropy.logit_scale = 2.0

    config.zlpr = ml_collections.ConfigDict()
    config.zlpr.num_features = 64
    config.zlpr.num_classes = 20
    config.zlpr.positives_per_example = 3.0
    config.zlpr.label_noise = 0.05
    config.zlpr.train_size = 8192
    config.zlpr.eval_size = 2048
    config.zlpr.batch_size = 128
    config.zlpr.steps = 1000
    config.zlpr.eval_every = 250
    # Amos: global rate xi ~ 1/sqrt(number of batches); eta from the init.
    config.zlpr.amos_learning_rate = 0.02
    # Amos-style Adam: alpha_0 and the half-life (steps) of its decay schedule.
    config.zlpr.amos_style_learning_rate = 0.01
    config.zlpr.amos_style_half_life = 500
    return config
