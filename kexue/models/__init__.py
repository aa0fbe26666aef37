"""Flax NNX models built from `kexue.ops` (RoFormer, causal LM, GlobalPointer NER, ZLPR
classifier, ViT with 2-D RoPE), every parameter annotated with logical axis names.

Empty until the models issue (#4) lands; the sub-package exists so the layout of
STYLE.md is fixed from the start.
"""
