"""kexue: JAX/Flax research code for ideas from Scientific Spaces (kexue.fm).

Sub-packages are imported on demand so that `import kexue.ops` stays light:
`kexue.ops` needs only JAX, `kexue.optim` adds Optax. `kexue.load(workdir)` (a
trained model from its run directory, `kexue.saved`) is imported on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from kexue.saved import load

        return load
    raise AttributeError(f"module 'kexue' has no attribute {name!r}")
