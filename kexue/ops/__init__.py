"""Pure JAX ops: RoPE, attention and masks, GlobalPointer, ZLPR losses, distances."""
