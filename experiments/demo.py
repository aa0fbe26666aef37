"""A tour of kexue's ops and optimizers; the default job of `make run`.

    python -m experiments.demo --config configs/demo.py [--config.zlpr.steps=2000]

Every number printed is computed by this run (see configs/demo.py for what each
section measures).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from ml_collections import config_flags

from kexue import ops, optim

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config file.")


def rope_decay(config) -> None:
    """Mean |<R_m q, R_n k>| / d for all-ones q, k, over distance buckets."""
    d = config.head_dim
    ones = jnp.ones((1, 1, d), jnp.float32)
    max_distance = max(config.distances) * 2 + 1
    distances = jnp.arange(max_distance)
    rotated_q = ops.apply_rope(ones, jnp.zeros((1,)), base=config.base)
    rotated_k = ops.apply_rope(jnp.broadcast_to(ones, (max_distance, 1, d)), distances,
                               base=config.base)
    dots = np.abs(np.asarray(jnp.einsum("qhd,khd->k", rotated_q, rotated_k))) / d
    print(f"RoPE long-range decay (head dim {d}, base {config.base:g}); "
          "mean |<R_m 1, R_n 1>| / d over n - m in [D, 2D]:")
    print("  " + "  ".join(f"D={dist:<5d}" for dist in config.distances))
    print("  " + "  ".join(f"{dots[dist:2 * dist + 1].mean():<7.3f}" for dist in config.distances))


def attention_entropy(config, key: jax.Array) -> None:
    """Mean attention entropy per query (nats) as the key count grows."""
    d = config.head_dim
    rows = []
    for n in config.key_counts:
        key, kq, kk = jax.random.split(key, 3)
        q = config.logit_scale * jax.random.normal(kq, (config.num_queries, d))
        k = jax.random.normal(kk, (n, d))
        logits = q @ k.T / math.sqrt(d)
        scale = ops.entropy_invariant_scale(jnp.full((config.num_queries, 1), n),
                                            entropy_base=config.entropy_base)
        entropies = []
        for z in (logits, logits * scale):
            p = jax.nn.softmax(z, axis=-1)
            entropies.append(float(-(p * jnp.log(p + 1e-30)).sum(-1).mean()))
        rows.append((n, *entropies))
    print(f"\nAttention entropy (nats) vs number of keys n (entropy base {config.entropy_base:g}):")
    print("  n      standard  entropy-invariant")
    for n, h_standard, h_invariant in rows:
        print(f"  {n:<6d} {h_standard:8.3f}  {h_invariant:8.3f}")


def _multilabel_data(config, key: jax.Array):
    """A planted linear multi-label problem: labels are the top classes of X W*."""
    total = config.train_size + config.eval_size
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (total, config.num_features))
    w = jax.random.normal(kw, (config.num_features, config.num_classes))
    scores = x @ w / math.sqrt(config.num_features)
    # Threshold so each example has `positives_per_example` labels on average.
    quantile = 1.0 - config.positives_per_example / config.num_classes
    labels = scores > jnp.quantile(scores, quantile)
    flips = jax.random.bernoulli(kn, config.label_noise, labels.shape)
    labels = jnp.logical_xor(labels, flips).astype(jnp.float32)
    split = config.train_size
    return (x[:split], labels[:split]), (x[split:], labels[split:])


def _micro_f1(logits: jax.Array, labels: jax.Array) -> float:
    predicted = logits > 0  # ZLPR's decision threshold is 0 by construction.
    tp = jnp.sum(predicted & (labels > 0.5))
    return float(2 * tp / (predicted.sum() + (labels > 0.5).sum()))


def zlpr_training(config, key: jax.Array) -> None:
    key_data, key_init = jax.random.split(key)
    (x_train, y_train), (x_eval, y_eval) = _multilabel_data(config, key_data)
    params = {
        "kernel": jax.random.normal(key_init, (config.num_features, config.num_classes))
        / math.sqrt(config.num_features),
        "bias": jnp.zeros((config.num_classes,)),
    }

    def loss_fn(params, x, y):
        return ops.zlpr_loss(x @ params["kernel"] + params["bias"], y).mean()

    optimizers = {
        "amos": optim.amos(config.amos_learning_rate, optim.eta_fn_from_init(params)),
        "amos_style(adam)": optim.amos_style(
            config.amos_style_learning_rate, direction="adam",
            sigma_fn=optim.eta_fn_from_init(params), half_life=config.amos_style_half_life),
    }
    batches_per_epoch = config.train_size // config.batch_size
    print(f"\nZLPR multi-label ({config.num_classes} classes, ~{config.positives_per_example:g} "
          f"positive, {config.label_noise:.0%} label noise), linear model, "
          f"{config.steps} steps of batch {config.batch_size}:")
    for name, tx in optimizers.items():

        @jax.jit
        def train_step(params, opt_state, step, tx=tx):
            start = (step % batches_per_epoch) * config.batch_size
            x = jax.lax.dynamic_slice_in_dim(x_train, start, config.batch_size)
            y = jax.lax.dynamic_slice_in_dim(y_train, start, config.batch_size)
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        p, opt_state = params, tx.init(params)
        started = time.perf_counter()
        for step in range(1, config.steps + 1):
            p, opt_state, _ = train_step(p, opt_state, step - 1)
            if step % config.eval_every == 0 or step == config.steps:
                eval_logits = x_eval @ p["kernel"] + p["bias"]
                eval_loss = float(ops.zlpr_loss(eval_logits, y_eval).mean())
                print(f"  {name:<17s} step {step:>5d}  eval loss {eval_loss:.4f}  "
                      f"eval micro-F1 {_micro_f1(eval_logits, y_eval):.4f}")
        print(f"  {name:<17s} {time.perf_counter() - started:.1f}s")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    key = jax.random.key(config.seed)
    key_entropy, key_zlpr = jax.random.split(key)
    print(f"kexue demo on {jax.default_backend()} ({jax.device_count()} device(s))\n")
    rope_decay(config.rope)
    attention_entropy(config.entropy, key_entropy)
    zlpr_training(config.zlpr, key_zlpr)


if __name__ == "__main__":
    app.run(main)
