"""Pure JAX ops: RoPE, attention and masks, GlobalPointer, ZLPR losses, distances.

Every function is a pure `jax.numpy` computation (jit, vmap and grad safe) that
validates its arguments' static shapes and dtypes eagerly and raises `ValueError`
naming the argument. Importing this package loads JAX and NumPy only.

    from kexue import ops
    q = ops.apply_rope(q, positions)
    out = ops.dot_product_attention(q, k, v, mask=mask, scale="entropy_invariant")
    out = ops.dot_product_attention(q, k, v, mask=ops.AttentionMask(valid=valid, causal=True),
                                    implementation="blocked")  # memory linear in n
"""

from kexue.ops.attention import (
    attention_entropy,
    dot_product_attention,
    entropy_invariant_scale,
)
from kexue.ops.distances import bhattacharyya_distance, gaussian_kl, wasserstein2_distance
from kexue.ops.global_pointer import (
    decode_spans,
    efficient_global_pointer_logits,
    f1_from_counts,
    global_pointer_logits,
    span_f1,
    spans_to_dense,
    spans_to_flat,
)
from kexue.ops.losses import global_pointer_kl, softmax_kl, sparse_zlpr_loss, zlpr_loss
from kexue.ops.masks import (
    AttentionMask,
    causal_mask,
    combine_masks,
    padding_mask,
    prefix_lm_mask,
)
from kexue.ops.rope import apply_rope, apply_rope_nd, rope_frequencies, rope_sin_cos

__all__ = [
    "AttentionMask",
    "apply_rope",
    "apply_rope_nd",
    "attention_entropy",
    "bhattacharyya_distance",
    "causal_mask",
    "combine_masks",
    "decode_spans",
    "dot_product_attention",
    "efficient_global_pointer_logits",
    "entropy_invariant_scale",
    "f1_from_counts",
    "gaussian_kl",
    "global_pointer_kl",
    "global_pointer_logits",
    "padding_mask",
    "prefix_lm_mask",
    "rope_frequencies",
    "rope_sin_cos",
    "softmax_kl",
    "span_f1",
    "spans_to_dense",
    "spans_to_flat",
    "sparse_zlpr_loss",
    "wasserstein2_distance",
    "zlpr_loss",
]
