"""kexue: JAX/Flax research code for ideas from Scientific Spaces (kexue.fm).

Sub-packages are imported on demand so that `import kexue.ops` stays light:
`kexue.ops` needs only JAX, `kexue.optim` adds Optax.
"""

__version__ = "0.1.0"
