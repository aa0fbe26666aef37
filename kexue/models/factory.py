"""Build any kexue model from the `model` section of an ml_collections config.

    config.model.name = "roformer_mlm"
    config.model.width, config.model.num_layers, config.model.num_heads = 256, 4, 4
    ...
    with nnx.use_eager_sharding(False):
        model = build_model(config, rngs=nnx.Rngs(0))
    count_params(model), flops_per_token(config)

Keys of `config.model`: `name`, every field of `TransformerConfig`, the keys of the
chosen model (`MODEL_KEYS`), and `seq_len` (tokens per example, read by
`flops_per_token`). An unknown key is an error, so a typo cannot be silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from kexue.models.causal_lm import CausalLM
from kexue.models.config import TRANSFORMER_KEYS, TransformerConfig, config_error
from kexue.models.layers import Embed
from kexue.models.roformer import (
    BIOTagger,
    GlobalPointerNER,
    MultiLabelClassifier,
    RoFormerEncoder,
    RoFormerMLM,
)
from kexue.models.vit import ViT

#: Model-specific keys of `config.model` (name → {key: constructor argument}).
MODEL_KEYS: dict[str, dict[str, str]] = {
    "roformer": {},
    "roformer_mlm": {"tie_embeddings": "tie_embeddings"},
    "causal_lm": {"tie_embeddings": "tie_embeddings"},
    "global_pointer_ner": {"num_types": "num_types", "gp_head_dim": "head_dim",
                           "efficient": "efficient", "gp_loss": "loss", "gp_rope": "rope"},
    "bio_tagger": {"num_types": "num_types"},
    "multilabel_classifier": {"num_classes": "num_classes", "pooling": "pooling"},
    "vit": {"image_size": "image_size", "patch_size": "patch_size",
            "num_classes": "num_classes", "num_channels": "num_channels"},
}
MODEL_NAMES = tuple(MODEL_KEYS)
_CONSTRUCTORS: dict[str, Callable[..., nnx.Module]] = {
    "roformer": RoFormerEncoder,
    "roformer_mlm": RoFormerMLM,
    "causal_lm": CausalLM,
    "global_pointer_ner": GlobalPointerNER,
    "bio_tagger": BIOTagger,
    "multilabel_classifier": MultiLabelClassifier,
    "vit": ViT,
}
_COMMON_KEYS = ("name", "seq_len")


def _model_section(config: Any) -> dict[str, Any]:
    """`config.model` (or `config` itself when it has no `model` key) as a plain dict."""
    section = config["model"] if "model" in config else config
    if hasattr(section, "to_dict"):
        section = section.to_dict()
    if not isinstance(section, Mapping) or "name" not in section:
        raise ValueError("config key `model.name`: expected one of "
                         f"{list(MODEL_NAMES)}; got no `model.name` in the config.")
    return dict(section)


def parse_model_config(config: Any) -> tuple[str, TransformerConfig, dict[str, Any]]:
    """`(name, TransformerConfig, model keyword arguments)` from `config.model`.

    Raises:
      ValueError: unknown `model.name`, an unknown key, or a bad value (the message
        names the key, what was expected and what was given).
    """
    section = _model_section(config)
    name = section["name"]
    if name not in MODEL_KEYS:
        raise config_error("name", f"one of {list(MODEL_NAMES)}", name)
    model_keys = MODEL_KEYS[name]
    known = set(TRANSFORMER_KEYS) | set(model_keys) | set(_COMMON_KEYS)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"config key(s) {['model.' + k for k in unknown]} are not used by "
                         f"model {name!r}; expected keys among {sorted(known)}.")
    transformer = {k: v for k, v in section.items() if k in TRANSFORMER_KEYS}
    if name == "vit":
        transformer.setdefault("rope_dims", 2)
    missing = [k for k in ("width", "num_layers", "num_heads", "mlp_dim")
               if k not in transformer]
    if missing:
        raise ValueError(f"config key(s) {['model.' + k for k in missing]} are required; "
                         "got none.")
    kwargs = {arg: section[key] for key, arg in model_keys.items() if key in section}
    return name, TransformerConfig(**transformer), kwargs


def build_model(config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model `config.model.name` names, built from `config.model`.

    Names: ``"roformer"`` (encoder only), ``"roformer_mlm"``, ``"causal_lm"``,
    ``"global_pointer_ner"``, ``"bio_tagger"``, ``"multilabel_classifier"``, ``"vit"``.
    Parameters are created with logical-axis metadata and without eager sharding;
    shard them with `kexue.parallel.init_sharded` (jitted init straight onto the mesh) or
    `kexue.parallel.nnx_state_shardings`.

    Args:
      config: a `ConfigDict` (or mapping) with a `model` section, or the section itself.
      rngs: `nnx.Rngs` with a `params` stream (and `dropout` when dropout is used; the
        default stream serves both).
    """
    name, transformer, kwargs = parse_model_config(config)
    with nnx.use_eager_sharding(False):
        return _CONSTRUCTORS[name](transformer, **kwargs, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's `nnx.Param`s (concrete or abstract)."""
    params = nnx.state(model, nnx.Param)
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _lookup_only_params(model: nnx.Module) -> int:
    """Parameters of embedding tables that are only indexed (no matmul FLOPs).

    Every `Embed` (token, position and token-type tables) except a token table tied
    to the output layer, which the logits multiply by.
    """
    tied = None
    if isinstance(model, CausalLM) and model.lm_head is None:
        tied = model.embed
    elif isinstance(model, RoFormerMLM) and model.decoder is None:
        tied = model.encoder.embed
    return sum(count_params(node) for _, node in nnx.iter_graph(model)
               if isinstance(node, Embed) and node is not tied)


def flops_per_token(config: Any, *, seq_len: int | None = None, training: bool = True) -> int:
    """Estimated FLOPs per token (per patch for the ViT), for MFU.

    `training`: `6·N + 12·L·h·d·n` (forward `2·N + 4·L·h·d·n`, backward twice the
    forward), the PaLM appendix-B estimate; otherwise the forward part only. Here `N`
    is the number of parameters that take part in a matmul (all of them except the
    embedding tables that are only indexed: an untied token table, the position and
    token-type tables; a tied token table counts, as the output layer multiplies by
    it), `L` the layers, `h·d = D` the attention width and `n` the sequence length
    (keys per query; the causal mask is not discounted). The
    GlobalPointer head adds its span scores `2·n·types·d_gp` (`2·n·d_gp` for the
    efficient head) to the forward part. Norms, softmax and activations are ignored.

    Args:
      config: as for `build_model`.
      seq_len: tokens per example; default `config.model.seq_len` (for the ViT, the
        number of patches).
      training: forward + backward (True) or forward only.
    """
    name, transformer, kwargs = parse_model_config(config)
    section = _model_section(config)
    if name == "vit":
        seq_len = (kwargs["image_size"] // kwargs["patch_size"]) ** 2
    elif seq_len is None:
        seq_len = section.get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise config_error("seq_len", "a positive int (or pass `seq_len=`)", seq_len)
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    matmul_params = count_params(abstract) - _lookup_only_params(abstract)
    forward = 2 * matmul_params + 4 * transformer.num_layers * transformer.width * seq_len
    if name == "global_pointer_ner":
        head_dim = kwargs.get("head_dim", 64)
        types = 1 if kwargs.get("efficient", False) else kwargs["num_types"]
        forward += 2 * seq_len * types * head_dim
    return 3 * forward if training else forward
