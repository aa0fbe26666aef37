"""Build any kexue model from a `ModelSpec`: its name and flat settings, typed and checked.

    spec = ModelSpec.from_settings({"name": "roformer_mlm", "width": 256, "num_layers": 4,
                                    "num_heads": 4, "mlp_dim": 1024, "vocab_size": 259})
    model = build_model(spec, rngs=nnx.Rngs(0))     # no eager sharding
    count_params(model), flops_per_token(spec, seq_len=64)

Settings: `name`, every field of `TransformerConfig` and the keys of the chosen model
(`MODEL_KEYS`). An unknown key is an error, so a typo cannot be silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from kexue.models.causal_lm import CausalLM
from kexue.models.config import TRANSFORMER_KEYS, TransformerConfig, argument_error
from kexue.models.layers import Embed
from kexue.models.roformer import (
    BIOTagger,
    GlobalPointerNER,
    MultiLabelClassifier,
    RoFormerEncoder,
    RoFormerMLM,
)
from kexue.models.vit import ViT

#: Model-specific settings (name → {setting: constructor argument}).
MODEL_KEYS: dict[str, dict[str, str]] = {
    "roformer": {},
    "roformer_mlm": {"tie_embeddings": "tie_embeddings"},
    "causal_lm": {"tie_embeddings": "tie_embeddings"},
    "global_pointer_ner": {"num_types": "num_types", "gp_head_dim": "head_dim",
                           "efficient": "efficient", "gp_loss": "loss", "gp_rope": "rope",
                           "gp_head_init_std": "head_init_std"},
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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model, with which settings.

    Attributes:
      name: one of `MODEL_NAMES`.
      transformer: the transformer stack's `TransformerConfig`.
      options: the model's own constructor arguments (see `MODEL_KEYS`).
    """

    name: str
    transformer: TransformerConfig
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ModelSpec:
        """From flat settings: `name`, `TransformerConfig` fields and `MODEL_KEYS[name]`.

        Raises:
          ValueError: an unknown `name` or setting, a missing required one, or a bad
            value (naming the setting, what was expected and what was given).
        """
        settings = dict(settings)
        name = settings.pop("name", None)
        if name not in MODEL_KEYS:
            raise argument_error("name", f"one of {list(MODEL_NAMES)}", name)
        model_keys = MODEL_KEYS[name]
        unknown = sorted(set(settings) - set(TRANSFORMER_KEYS) - set(model_keys))
        if unknown:
            raise ValueError(f"`{unknown[0]}`: not a setting of model {name!r} "
                             f"(unknown: {unknown}); expected keys among "
                             f"{sorted({*TRANSFORMER_KEYS, *model_keys})}.")
        transformer = {k: v for k, v in settings.items() if k in TRANSFORMER_KEYS}
        if name == "vit":
            transformer.setdefault("rope_dims", 2)
        missing = [k for k in ("width", "num_layers", "num_heads", "mlp_dim")
                   if k not in transformer]
        if missing:
            raise ValueError(f"`{missing[0]}`: required; got no value for {missing}.")
        options = {arg: settings[key] for key, arg in model_keys.items() if key in settings}
        return cls(name, TransformerConfig(**transformer), options)

    def settings(self) -> dict[str, Any]:
        """The flat settings this spec was made from (`from_settings` inverts it)."""
        arguments = {arg: key for key, arg in MODEL_KEYS[self.name].items()}
        return {"name": self.name, **dataclasses.asdict(self.transformer),
                **{arguments[arg]: value for arg, value in self.options.items()}}

    def setting_of(self, argument: str) -> str:
        """The setting behind constructor argument `argument` (itself if not renamed)."""
        return {arg: key for key, arg in MODEL_KEYS[self.name].items()}.get(argument, argument)


def build_model(spec: ModelSpec, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model of `spec` (parameters created without eager sharding).

    Names: ``"roformer"`` (encoder only), ``"roformer_mlm"``, ``"causal_lm"``,
    ``"global_pointer_ner"``, ``"bio_tagger"``, ``"multilabel_classifier"``, ``"vit"``.
    Parameters carry logical-axis metadata; shard them with
    `kexue.parallel.init_sharded` (jitted init straight onto the mesh) or
    `kexue.parallel.nnx_state_shardings`.

    Args:
      spec: the `ModelSpec`.
      rngs: `nnx.Rngs` with a `params` stream (and `dropout` when dropout is used; the
        default stream serves both).
    """
    if not isinstance(spec, ModelSpec):
        raise argument_error("spec", "a ModelSpec (ModelSpec.from_settings(...))",
                             type(spec).__name__)
    with nnx.use_eager_sharding(False):
        return _CONSTRUCTORS[spec.name](spec.transformer, **spec.options, rngs=rngs)


def initial_params(model_factory: Callable[[], nnx.Module]) -> Any:
    """The pure `nnx.State` of the `nnx.Param`s a model factory initialises (unsharded)."""
    with nnx.use_eager_sharding(False):
        model = model_factory()
    return nnx.as_pure(nnx.split(model, nnx.Param, ...)[1])


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


def flops_per_token(spec: ModelSpec, *, seq_len: int | None = None,
                    training: bool = True) -> int:
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
      spec: the model.
      seq_len: tokens per example (ignored for the ViT: its number of patches).
      training: forward + backward (True) or forward only.
    """
    transformer, options = spec.transformer, spec.options
    if spec.name == "vit":
        seq_len = (options["image_size"] // options["patch_size"]) ** 2
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise argument_error("seq_len", "a positive int", seq_len)
    abstract = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    matmul_params = count_params(abstract) - _lookup_only_params(abstract)
    forward = 2 * matmul_params + 4 * transformer.num_layers * transformer.width * seq_len
    if spec.name == "global_pointer_ner":
        head_dim = options.get("head_dim", 64)
        types = 1 if options.get("efficient", False) else options["num_types"]
        forward += 2 * seq_len * types * head_dim
    return 3 * forward if training else forward
