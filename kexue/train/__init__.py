"""Pure train/eval steps, the training loop, Orbax checkpointing and metric writers.

Empty until the training-system issue (#5) lands; the sub-package exists so the
layout of STYLE.md is fixed from the start.
"""
