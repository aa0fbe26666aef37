"""Small model configs shared by the model tests."""

from __future__ import annotations

from flax import nnx

from kexue import models


def model_config(name: str, **overrides) -> models.ModelSpec:
    """The `ModelSpec` of a tiny `name` (width 32, 1 layer, 4 heads)."""
    model = dict(name=name, width=32, num_layers=1, num_heads=4, mlp_dim=64, vocab_size=64)
    if name == "global_pointer_ner":
        model.update(num_types=3, gp_head_dim=8)
    elif name == "multilabel_classifier":
        model.update(num_classes=5)
    elif name == "vit":
        del model["vocab_size"]
        model.update(image_size=8, patch_size=2, num_classes=5, num_channels=3)
    model.update(overrides)
    return models.ModelSpec.from_settings(model)


@nnx.jit
def forward(model, *args, **kwargs):
    """`model(*args, **kwargs)` compiled (one XLA program instead of op-by-op dispatch)."""
    return model(*args, **kwargs)
