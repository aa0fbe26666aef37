"""TFDS builders in `array_record` format (read without TensorFlow) and Grain pipelines.

Empty until the training-system issue (#5) lands; the sub-package exists so the
layout of STYLE.md is fixed from the start.
"""
