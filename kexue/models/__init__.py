"""Flax NNX models built from `kexue.ops`, every parameter named by logical axes.

    from flax import nnx
    from kexue import models
    model = models.build_model(config, rngs=nnx.Rngs(0))   # config.model.name selects
    models.count_params(model), models.flops_per_token(config)

* `RoFormerEncoder`, `RoFormerMLM` — RoPE encoder (kexue.fm/archives/8265), MLM head.
* `CausalLM` — decoder with a `KVCache`, `decode` and `generate`.
* `GlobalPointerNER` — GlobalPointer / Efficient GlobalPointer span head, ZLPR loss.
* `BIOTagger` — token-level softmax BIO tagging baseline on the same encoder.
* `MultiLabelClassifier` — pooled encoder with a ZLPR multi-label head.
* `ViT` — vision transformer with 2-D RoPE over patch positions (archive 8397).

Parameters carry `out_sharding` logical names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `types`, `classes`, `norm`) that
`kexue.parallel.nnx_state_shardings` maps to the mesh; `kexue.parallel.init_sharded`
creates a model directly in its sharded layout.
"""

from kexue.models.causal_lm import CACHE_AXES, CausalLM, KVCache, sample_logits
from kexue.models.config import TransformerConfig
from kexue.models.factory import (
    MODEL_KEYS,
    MODEL_NAMES,
    build_model,
    count_params,
    flops_per_token,
    parse_model_config,
)
from kexue.models.layers import (
    REMAT_CPU_COMPILER_OPTIONS,
    REMAT_POLICIES,
    Attention,
    Dense,
    Embed,
    FeedForward,
    LayerCache,
    Norm,
    Transformer,
    TransformerBlock,
    cross_entropy,
)
from kexue.models.roformer import (
    BIOTagger,
    GlobalPointerNER,
    MultiLabelClassifier,
    RoFormerEncoder,
    RoFormerMLM,
    bio_num_tags,
    bio_span_scores,
    bio_tags_from_spans,
)
from kexue.models.vit import ViT, patch_positions

__all__ = [
    "CACHE_AXES",
    "MODEL_KEYS",
    "MODEL_NAMES",
    "REMAT_CPU_COMPILER_OPTIONS",
    "REMAT_POLICIES",
    "Attention",
    "BIOTagger",
    "CausalLM",
    "Dense",
    "Embed",
    "FeedForward",
    "GlobalPointerNER",
    "KVCache",
    "LayerCache",
    "MultiLabelClassifier",
    "Norm",
    "RoFormerEncoder",
    "RoFormerMLM",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "ViT",
    "bio_num_tags",
    "bio_span_scores",
    "bio_tags_from_spans",
    "build_model",
    "count_params",
    "cross_entropy",
    "flops_per_token",
    "parse_model_config",
    "patch_positions",
    "sample_logits",
]
