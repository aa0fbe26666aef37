"""Vision transformer with 2-D rotary position embedding over patch positions.

Images `[b, H, W, C]` are cut into `p × p` patches, each flattened and projected to
the model width. Patch `(row, col)` is encoded by 2-D RoPE inside attention
(kexue.fm/archives/8397, `ops.apply_rope_nd`): the rotary features of each head are
split in two halves, rotated by `row` and by `col`. No position embedding table and no
class token: the encoder output is mean-pooled and classified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kexue.models.config import (
    TransformerConfig,
    argument_error,
    check_no_embedding_tables,
    check_positive_int,
)
from kexue.models.layers import Dense, Transformer


def patch_positions(grid_rows: int, grid_cols: int) -> np.ndarray:
    """int32 `[rows·cols, 2]` `(row, col)` of each patch, row-major."""
    rows, cols = np.meshgrid(np.arange(grid_rows), np.arange(grid_cols), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.int32)


class ViT(nnx.Module):
    """Patch projection `[p·p·C, D]` (axes `(None, embed)`), transformer with 2-D RoPE,
    mean pooling, class scores `[D, classes]` (axes `(embed, classes)`)."""

    def __init__(self, config: TransformerConfig, *, image_size: int, patch_size: int,
                 num_classes: int, num_channels: int = 3, rngs: nnx.Rngs):
        for key, value in (("image_size", image_size), ("patch_size", patch_size),
                           ("num_classes", num_classes), ("num_channels", num_channels)):
            check_positive_int(key, value)
        if image_size % patch_size:
            raise argument_error("patch_size", f"a divisor of `image_size` = {image_size}",
                               patch_size)
        if config.rope_dims != 2:
            raise argument_error("rope_dims", "2 for the ViT (row and column)", config.rope_dims)
        check_no_embedding_tables(config, "vit")
        c = config
        self.config, self.patch_size, self.num_channels = c, patch_size, num_channels
        self.grid = image_size // patch_size
        self.patch_embed = Dense(patch_size * patch_size * num_channels, c.width,
                                 in_axes=(None,), out_axes=("embed",), dtype=c.compute_dtype,
                                 param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)
        self.transformer = Transformer(c, rngs=rngs)
        self.head = Dense(c.width, num_classes, in_axes=("embed",), out_axes=("classes",),
                          dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                          init_std=c.init_std, rngs=rngs)

    def patchify(self, images: jax.Array) -> jax.Array:
        """`[b, H, W, C]` → `[b, (H/p)(W/p), p·p·C]` (row-major over patches)."""
        b, height, width, channels = images.shape
        p, g = self.patch_size, self.grid
        if (height, width, channels) != (g * p, g * p, self.num_channels):
            raise ValueError(f"`images` must have shape [b, {g * p}, {g * p}, "
                             f"{self.num_channels}]; got {images.shape}.")
        x = images.reshape(b, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, p * p * channels)

    def __call__(self, images: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """float32 class logits `[b, classes]`."""
        x = self.patch_embed(self.patchify(images))
        hidden, _ = self.transformer(x, positions=patch_positions(self.grid, self.grid),
                                     deterministic=deterministic)
        pooled = jnp.mean(hidden.astype(jnp.float32), axis=1)
        return self.head(pooled).astype(jnp.float32)
