"""Writes `tf_made.ckpt.{index,data-00000-of-00001}` with TensorFlow itself (`SaveV2`).

The committed files let the tests check `kexue.models.TFCheckpoint` against bytes that
TensorFlow wrote, without TensorFlow. `expected_tensors()` (also used by the tests)
defines every value. Regenerate with `python make_fixture.py` in an environment that
has `tensorflow` (not a kexue dependency).
"""

from __future__ import annotations

import os

import numpy as np

#: Enough entries for several 4 KiB blocks of TensorFlow's index table.
NUM_LAYERS = 300


def expected_tensors() -> dict[str, tuple[str, np.ndarray]]:
    """name → (dtype name, values as float64 or the integer / bool values)."""
    tensors = {}
    for i in range(NUM_LAYERS):
        tensors[f"bert/encoder/layer_{i}/output/dense/bias"] = (
            "float32", (i + 0.25 * np.arange(6, dtype=np.float64)).reshape(2, 3))
    tensors["global_step"] = ("int64", np.array(123456789012))
    tensors["scalars/half"] = ("float16", np.array([[0.5, -1.25], [3.0, 1024.0]]))
    tensors["scalars/double"] = ("float64", np.array([np.pi, -np.e, 1e-300]))
    tensors["scalars/bfloat16"] = ("bfloat16", np.array([1.0, -2.5, 0.15625, 2.0**127]))
    tensors["scalars/int32"] = ("int32", np.array([-(2**31), 0, 2**31 - 1]))
    tensors["scalars/int8"] = ("int8", np.arange(-3, 4))
    tensors["scalars/uint8"] = ("uint8", np.array([0, 7, 255]))
    tensors["scalars/bool"] = ("bool", np.array([True, False, True]))
    tensors["scalars/empty"] = ("float32", np.zeros((0, 4)))
    return tensors


def main() -> None:
    import tensorflow as tf

    names, values = [], []
    for name, (dtype, value) in expected_tensors().items():
        names.append(name)
        values.append(tf.cast(tf.constant(value), getattr(tf, dtype)))
    prefix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_made.ckpt")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=values)
    print(f"wrote {prefix}.index and its data file ({len(names)} tensors, "
          f"TensorFlow {tf.__version__})")


if __name__ == "__main__":
    main()
