"""Read TensorFlow (V2, "tensor bundle") checkpoints with NumPy alone, no TensorFlow.

A checkpoint with prefix `P` (e.g. `bert_model.ckpt`) is two kinds of file:

* `P.index`: a LevelDB-format sorted table (SSTable) mapping each tensor name to a
  serialized `BundleEntryProto` (dtype, shape, shard, byte offset, size, masked
  CRC-32C of the bytes); the empty key holds the `BundleHeaderProto` (number of data
  shards, byte order). Blocks are stored uncompressed, each followed by a one-byte
  compression type and the masked CRC-32C of block and type; a 48-byte footer ends
  the file (handles of the meta-index and index blocks, magic `0xdb4775248b80fb57`).
* `P.data-SSSSS-of-NNNNN`: the raw tensor bytes, row-major, at the entries' offsets.

`TFCheckpoint` parses the index eagerly (it is small) and reads a tensor's bytes only
when asked, checking its size and, by default, its CRC-32C (with `google-crc32c`,
part of the `pretrained` extra). The masked CRC is `rot_right(crc, 15) + 0xa282ead8`
(mod 2³²), as LevelDB masks checksums that are stored next to the data they cover.

Numeric and bool tensors are supported; strings, variants, resources and
partitioned (sliced) tensors are listed but raise a `ValueError` when read. BERT and
RoFormer checkpoints contain float32 tensors (and at most an int64 `global_step`).
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

import numpy as np

__all__ = ["TFCheckpoint", "TensorEntry", "masked_crc32c"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5
_MASK_DELTA = 0xA282EAD8


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a JAX dependency

    return np.dtype(ml_dtypes.bfloat16)


#: TensorFlow `DataType` enum value → NumPy dtype name (types.proto).
_NUMERIC_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    8: "complex64", 9: "int64", 10: "bool", 17: "uint16", 18: "complex128",
    19: "float16", 22: "uint32", 23: "uint64",
}
_BFLOAT16 = 14
_OTHER_DTYPES = {7: "string", 20: "resource", 21: "variant"}


def masked_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, masked as TensorFlow / LevelDB store it."""
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _crc32c(data: bytes) -> int:
    try:
        import google_crc32c
    except ImportError:
        raise ImportError(
            "verifying TensorFlow checkpoint checksums needs the `google-crc32c` package: "
            "pip install 'kexue[pretrained]' (or pass verify_checksums=False)") from None
    return int(google_crc32c.value(bytes(data)))


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """Base-128 varint at `buf[pos:]` → (value, next position)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"{what}: truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes, what: str) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message, in order.

    Varint and fixed-width fields give ints, length-delimited fields give bytes.
    """
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, what)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, what)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, what)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError(f"{what}: truncated protobuf message")
        fields.append((number, value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class TensorEntry:
    """Where and what one tensor is: a decoded `BundleEntryProto`."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked; None when the entry has none
    sliced: bool

    @property
    def dtype_name(self) -> str:
        if self.dtype == _BFLOAT16:
            return "bfloat16"
        return _NUMERIC_DTYPES.get(self.dtype) or _OTHER_DTYPES.get(self.dtype,
                                                                    f"DataType {self.dtype}")

    @classmethod
    def parse(cls, name: str, buf: bytes) -> TensorEntry:
        what = f"index entry {name!r}"
        values = {"dtype": 0, "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
        shape: tuple[int, ...] = ()
        sliced = False
        for number, value in _proto_fields(buf, what):
            if number == 1:
                values["dtype"] = value
            elif number == 2:
                shape = _parse_shape(value, what)
            elif number == 3:
                values["shard_id"] = value
            elif number == 4:
                values["offset"] = _signed64(value)
            elif number == 5:
                values["size"] = _signed64(value)
            elif number == 6:
                values["crc32c"] = value
            elif number == 7:
                sliced = True
        return cls(name=name, shape=shape, sliced=sliced, **values)


def _parse_shape(buf: bytes, what: str) -> tuple[int, ...]:
    """`TensorShapeProto` → dims (field 2: `Dim {size = 1}`; field 3: unknown rank)."""
    dims = []
    for number, value in _proto_fields(buf, what):
        if number == 2:
            size = 0
            for dim_number, dim_value in _proto_fields(value, what):
                if dim_number == 1:
                    size = _signed64(dim_value)
            if size < 0:
                raise ValueError(f"{what}: unknown dimension in the stored shape")
            dims.append(size)
        elif number == 3 and value:
            raise ValueError(f"{what}: the stored shape has unknown rank")
    return tuple(dims)


class TFCheckpoint:
    """The tensors of a TensorFlow V2 checkpoint, read lazily with NumPy.

        ckpt = TFCheckpoint("chinese_L-12_H-768_A-12/bert_model.ckpt")
        ckpt.names                       # sorted tensor names
        ckpt.shape("bert/embeddings/word_embeddings"), ckpt.dtype_name(...)
        ckpt.read("bert/embeddings/word_embeddings")   # np.ndarray [V, D]

    Args:
      prefix: the checkpoint prefix (`…/bert_model.ckpt`); a path ending in `.index`
        is accepted too.
      verify_checksums: check the CRC-32C of every index block when opening and of
        every tensor when reading it (needs `google-crc32c`).

    Raises:
      FileNotFoundError: no `prefix.index`.
      ValueError: a corrupt or unsupported index (message names the file and why).
    """

    def __init__(self, prefix: str | os.PathLike, *, verify_checksums: bool = True):
        prefix = os.fspath(prefix)
        if prefix.endswith(".index"):
            prefix = prefix[: -len(".index")]
        self.prefix = prefix
        self.verify_checksums = verify_checksums
        self.index_path = prefix + ".index"
        with open(self.index_path, "rb") as f:
            index = f.read()
        records = self._table_records(index)
        if not records or records[0][0] != b"":
            raise ValueError(f"{self.index_path}: no bundle header (the empty key); not a "
                             "TensorFlow V2 checkpoint index")
        header = dict(_proto_fields(records[0][1], f"{self.index_path} header"))
        self.num_shards = int(header.get(1, 1))
        self.big_endian = header.get(2, 0) == 1
        self.entries: dict[str, TensorEntry] = {}
        for key, value in records[1:]:
            name = key.decode("utf-8")
            self.entries[name] = TensorEntry.parse(name, value)

    # ------------------------------------------------------------------ index table

    def _table_records(self, index: bytes) -> list[tuple[bytes, bytes]]:
        path = self.index_path
        if len(index) < _FOOTER_SIZE:
            raise ValueError(f"{path}: {len(index)} bytes, shorter than an SSTable footer")
        footer = index[-_FOOTER_SIZE:]
        (magic,) = struct.unpack("<Q", footer[40:])
        if magic != _TABLE_MAGIC:
            raise ValueError(f"{path}: bad SSTable magic {magic:#x} (expected "
                             f"{_TABLE_MAGIC:#x}); not a TensorFlow V2 checkpoint index")
        _, pos = _varint(footer, 0, f"{path} footer")  # meta-index handle (unused)
        _, pos = _varint(footer, pos, f"{path} footer")
        index_offset, pos = _varint(footer, pos, f"{path} footer")
        index_size, pos = _varint(footer, pos, f"{path} footer")
        records = []
        for _, handle in self._block_entries(index, index_offset, index_size, "index block"):
            offset, pos = _varint(handle, 0, f"{path} block handle")
            size, _ = _varint(handle, pos, f"{path} block handle")
            records.extend(self._block_entries(index, offset, size, f"data block @{offset}"))
        keys = [key for key, _ in records]
        if keys != sorted(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"{path}: keys are not strictly increasing (corrupt table)")
        return records

    def _block_entries(self, index: bytes, offset: int, size: int,
                       what: str) -> list[tuple[bytes, bytes]]:
        path = self.index_path
        end = offset + size
        if end + _BLOCK_TRAILER_SIZE > len(index) - _FOOTER_SIZE:
            raise ValueError(f"{path}: {what} [{offset}, {end}) runs past the table")
        block = index[offset:end]
        kind = index[end]
        if self.verify_checksums:
            (stored,) = struct.unpack("<I", index[end + 1:end + _BLOCK_TRAILER_SIZE])
            actual = masked_crc32c(index[offset:end + 1])
            if stored != actual:
                raise ValueError(f"{path}: {what} checksum mismatch (stored {stored:#010x}, "
                                 f"computed {actual:#010x}); the file is corrupt")
        if kind != 0:
            raise ValueError(f"{path}: {what} is compressed (type {kind}); only "
                             "uncompressed tables (as TensorFlow writes them) are supported")
        if len(block) < 4:
            raise ValueError(f"{path}: {what} is shorter than its restart count")
        (num_restarts,) = struct.unpack("<I", block[-4:])
        limit = len(block) - 4 - 4 * num_restarts
        if limit < 0:
            raise ValueError(f"{path}: {what} has {num_restarts} restarts, more than fit")
        entries, pos, key = [], 0, b""
        while pos < limit:
            shared, pos = _varint(block, pos, f"{path} {what}")
            unshared, pos = _varint(block, pos, f"{path} {what}")
            value_size, pos = _varint(block, pos, f"{path} {what}")
            if shared > len(key) or pos + unshared + value_size > limit:
                raise ValueError(f"{path}: {what} has a malformed entry at byte {pos}")
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            entries.append((key, block[pos:pos + value_size]))
            pos += value_size
        return entries

    # ------------------------------------------------------------------ tensors

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names, sorted."""
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{name!r} is not in checkpoint {self.prefix}")
        return self.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype_name(self, name: str) -> str:
        return self._entry(name).dtype_name

    def data_path(self, shard_id: int) -> str:
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a NumPy array of its stored dtype and shape.

        Raises:
          KeyError: no such tensor.
          ValueError: unsupported dtype, a partitioned tensor, a size that does not
            match dtype and shape, or a checksum mismatch.
        """
        entry = self._entry(name)
        where = f"checkpoint {self.prefix}, tensor {name!r}"
        if entry.sliced:
            raise ValueError(f"{where}: partitioned (sliced) tensors are not supported")
        if entry.dtype == _BFLOAT16:
            dtype = _bfloat16()
        elif entry.dtype in _NUMERIC_DTYPES:
            dtype = np.dtype(_NUMERIC_DTYPES[entry.dtype])
        else:
            raise ValueError(f"{where}: dtype {entry.dtype_name} cannot be read as an array")
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != count * dtype.itemsize:
            raise ValueError(f"{where}: stored size {entry.size} bytes, but {entry.dtype_name} "
                             f"{list(entry.shape)} needs {count * dtype.itemsize}")
        if not 0 <= entry.shard_id < self.num_shards:
            raise ValueError(f"{where}: shard {entry.shard_id} of {self.num_shards}")
        with open(self.data_path(entry.shard_id), "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
        if len(data) != entry.size:
            raise ValueError(f"{where}: data file ends after {len(data)} of {entry.size} bytes")
        if self.verify_checksums and entry.crc32c is not None:
            actual = masked_crc32c(data)
            if actual != entry.crc32c:
                raise ValueError(f"{where}: checksum mismatch (stored {entry.crc32c:#010x}, "
                                 f"computed {actual:#010x}); the data file is corrupt")
        array = np.frombuffer(bytearray(data), dtype=dtype).reshape(entry.shape)
        if self.big_endian != (sys.byteorder == "big"):
            array.byteswap(inplace=True)
        return array

    def __repr__(self) -> str:
        return f"TFCheckpoint({self.prefix!r}, {len(self.entries)} tensors)"
