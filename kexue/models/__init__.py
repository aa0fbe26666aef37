"""Flax NNX models built from `kexue.ops`, every parameter named by logical axes.

    from flax import nnx
    from kexue import models
    spec = models.ModelSpec.from_settings({"name": "causal_lm", "width": 256, ...})
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    models.count_params(model), models.flops_per_token(spec, seq_len=128)

* `RoFormerEncoder`, `RoFormerMLM` — RoPE encoder (kexue.fm/archives/8265), MLM head.
* `CausalLM` — decoder with a `KVCache`, `decode`, `generate` and `stream`
  (greedy, temperature, top-k and top-p sampling: `sample_logits`).
* `GlobalPointerNER` — GlobalPointer / Efficient GlobalPointer span head, ZLPR loss.
* `BIOTagger` — token-level softmax BIO tagging baseline on the same encoder.
* `MultiLabelClassifier` — pooled encoder with a ZLPR multi-label head.
* `ViT` — vision transformer with 2-D RoPE over patch positions (archive 8397).
* `load_pretrained` — BERT / RoFormer checkpoints (Hugging Face safetensors or
  PyTorch, original TensorFlow) into the RoFormer encoder; `build_pretrained`,
  `load_pretrained_params`, `merge_pretrained_config`; `TFCheckpoint` reads
  TensorFlow checkpoints without TensorFlow.

Parameters carry `out_sharding` logical names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `positions`, `token_types`, `types`, `classes`, `norm`) that
`kexue.parallel.nnx_state_shardings` maps to the mesh; `kexue.parallel.init_sharded`
creates a model directly in its sharded layout.
"""

from kexue.models.causal_lm import CACHE_AXES, CausalLM, KVCache, check_sampling, sample_logits
from kexue.models.config import TransformerConfig
from kexue.models.factory import (
    MODEL_KEYS,
    MODEL_NAMES,
    ModelSpec,
    build_model,
    count_params,
    flops_per_token,
    initial_params,
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
    attention_entropies,
    cross_entropy,
)
from kexue.models.pretrained import (
    PretrainedCheckpoint,
    build_pretrained,
    checkpoint_vocab_file,
    load_pretrained,
    load_pretrained_params,
    merge_pretrained_config,
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
from kexue.models.tf_checkpoint import TFCheckpoint
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
    "ModelSpec",
    "MultiLabelClassifier",
    "Norm",
    "PretrainedCheckpoint",
    "RoFormerEncoder",
    "RoFormerMLM",
    "TFCheckpoint",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "ViT",
    "attention_entropies",
    "bio_num_tags",
    "bio_span_scores",
    "bio_tags_from_spans",
    "build_model",
    "build_pretrained",
    "check_sampling",
    "checkpoint_vocab_file",
    "count_params",
    "cross_entropy",
    "flops_per_token",
    "initial_params",
    "load_pretrained",
    "load_pretrained_params",
    "merge_pretrained_config",
    "patch_positions",
    "sample_logits",
]
