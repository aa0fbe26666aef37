"""`kexue.models.TFCheckpoint`: TensorFlow V2 checkpoints read without TensorFlow.

Two independent sources of checkpoint bytes: files TensorFlow itself wrote
(`data/tf_bundle`, made by its `make_fixture.py`) and the tests' own writer
(`tf_bundle_writer`, with a bitwise CRC-32C, small blocks and restart points).
"""

from __future__ import annotations

import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from kexue.models import TFCheckpoint
from kexue.models.tf_checkpoint import masked_crc32c
from tests.models import tf_bundle_writer
from tests.models.data.tf_bundle.make_fixture import expected_tensors

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "tf_bundle", "tf_made.ckpt")


def test_reads_every_tensor_tensorflow_wrote():
    ckpt = TFCheckpoint(FIXTURE)
    expected = expected_tensors()
    assert set(ckpt.names) == set(expected)
    for name, (dtype, values) in expected.items():
        array = ckpt.read(name)
        assert ckpt.dtype_name(name) == dtype
        assert array.dtype == (np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16"
                               else np.dtype(dtype)), name
        assert array.shape == values.shape == ckpt.shape(name), name
        if dtype in ("float16", "bfloat16"):  # values chosen exactly representable
            np.testing.assert_array_equal(array.astype(np.float64), values)
        else:
            np.testing.assert_array_equal(array, values.astype(dtype))


def test_reads_what_an_independent_writer_wrote(rng, tmp_path):
    tensors = {"global_step": np.array(rng.integers(0, 2**40), np.int64)}
    dtypes = ["float32", "float64", "float16", "int32", "int64", "int8", "uint8", "bool"]
    for i in range(int(rng.integers(40, 80))):
        shape = tuple(int(s) for s in rng.integers(0, 5, rng.integers(0, 4)))
        dtype = dtypes[i % len(dtypes)]
        values = rng.normal(size=shape) * 100
        array = values > 0 if dtype == "bool" else values.astype(dtype)
        # shared prefixes exercise the key compression of the index table
        tensors[f"bert/encoder/layer_{i}/attention/self/{['query', 'key'][i % 2]}"] = array
    tensors["w/transposed"] = rng.normal(size=(3, 5)).astype(np.float32).T
    prefix = str(tmp_path / "model.ckpt")
    tf_bundle_writer.write_checkpoint(prefix, tensors)
    ckpt = TFCheckpoint(prefix + ".index")  # the .index path works as the prefix
    assert ckpt.names == tuple(sorted(tensors))
    for name, array in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array)


def test_masked_crc32c_matches_the_bitwise_reference(rng):
    assert tf_bundle_writer.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for size in (0, 1, 7, 64, 1000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == tf_bundle_writer.mask(tf_bundle_writer.crc32c(data))


def copy_fixture(tmp_path) -> str:
    prefix = str(tmp_path / "tf_made.ckpt")
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(FIXTURE + suffix, prefix + suffix)
    return prefix


def flip_byte(path: str, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path):
    prefix = copy_fixture(tmp_path)
    name = "bert/encoder/layer_7/output/dense/bias"
    flip_byte(prefix + ".data-00000-of-00001", TFCheckpoint(prefix).entries[name].offset + 2)
    with pytest.raises(ValueError, match=f"tensor '{name}': checksum mismatch"):
        TFCheckpoint(prefix).read(name)
    unchecked = TFCheckpoint(prefix, verify_checksums=False).read(name)
    assert not np.array_equal(unchecked, expected_tensors()[name][1])


def test_corrupt_index_block_fails_the_checksum(tmp_path):
    prefix = copy_fixture(tmp_path)
    flip_byte(prefix + ".index", 40)
    with pytest.raises(ValueError, match=r"checksum mismatch.*the file is corrupt"):
        TFCheckpoint(prefix)


@pytest.mark.parametrize("damage", ["magic", "truncated", "short_data"])
def test_damaged_files_are_named_errors(tmp_path, damage):
    prefix = copy_fixture(tmp_path)
    index = prefix + ".index"
    if damage == "magic":
        flip_byte(index, os.path.getsize(index) - 1)
        match = "bad SSTable magic"
    elif damage == "truncated":
        with open(index, "r+b") as f:
            f.truncate(30)
        match = "shorter than an SSTable footer"
    else:
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(100)
        match = "data file ends after"
    with pytest.raises(ValueError, match=match):
        ckpt = TFCheckpoint(prefix)
        ckpt.read("scalars/bool")
        ckpt.read("global_step")


def test_unknown_tensor_and_missing_index(tmp_path):
    with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
        TFCheckpoint(FIXTURE).read("nope")
    with pytest.raises(FileNotFoundError):
        TFCheckpoint(str(tmp_path / "absent.ckpt"))
