"""A writer of TensorFlow V2 checkpoints ("tensor bundles") for the tests, no TensorFlow.

Independent of `kexue.models.tf_checkpoint` (the reader under test): its own varint
and protobuf encoders, its own bitwise CRC-32C, and an SSTable builder with a small
block size and restart interval so that the reader meets several data blocks,
prefix-compressed keys and restart points. The layout follows the LevelDB table
format and TensorFlow's `BundleWriter`: tensors concatenated in the data file,
entries sorted by name after the header entry (the empty key), uncompressed blocks
with a type byte and masked CRC-32C, a 48-byte footer with the table magic.
"""

from __future__ import annotations

import struct

import numpy as np

_DTYPE_ENUM = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
               "int64": 9, "bool": 10, "float16": 19}


def crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (reflected polynomial 0x82F63B78), slow but plainly right."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def entry_proto(dtype: int, shape: tuple[int, ...], offset: int, size: int,
                crc: int) -> bytes:
    shape_proto = b"".join(field_bytes(2, field_varint(1, dim)) for dim in shape)
    out = field_varint(1, dtype) + field_bytes(2, shape_proto)
    if offset:
        out += field_varint(4, offset)
    if size:
        out += field_varint(5, size)
    return out + field_fixed32(6, crc)


def header_proto(num_shards: int = 1) -> bytes:
    version = field_varint(1, 1)  # VersionDef.producer
    return field_varint(1, num_shards) + field_bytes(3, version)


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.restart_interval:
            while (shared < min(len(key), len(self.last_key))
                   and key[shared] == self.last_key[shared]):
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.count = 0
        self.buffer += varint(shared) + varint(len(key) - shared) + varint(len(value))
        self.buffer += key[shared:] + value
        self.last_key = key
        self.count += 1

    def finish(self) -> bytes:
        restarts = b"".join(struct.pack("<I", r) for r in self.restarts)
        return bytes(self.buffer) + restarts + struct.pack("<I", len(self.restarts))

    def empty(self) -> bool:
        return not self.buffer


def sstable(records: list[tuple[bytes, bytes]], *, block_size: int = 256,
            restart_interval: int = 3) -> bytes:
    """LevelDB-format table of sorted `records` (uncompressed blocks)."""
    out = bytearray()
    index = _BlockBuilder(1)

    def flush(block: _BlockBuilder, last_key: bytes) -> None:
        contents = block.finish()
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", mask(crc32c(contents + b"\x00"))))
        index.add(last_key, handle)

    block = _BlockBuilder(restart_interval)
    for key, value in records:
        block.add(key, value)
        if len(block.buffer) >= block_size:
            flush(block, key)
            block = _BlockBuilder(restart_interval)
    if not block.empty():
        flush(block, records[-1][0])

    def raw_block(builder: _BlockBuilder) -> tuple[int, int]:
        contents = builder.finish()
        offset = len(out)
        out.extend(contents + b"\x00" + struct.pack("<I", mask(crc32c(contents + b"\x00"))))
        return offset, len(contents)

    meta_offset, meta_size = raw_block(_BlockBuilder(restart_interval))
    index_offset, index_size = raw_block(index)
    handles = varint(meta_offset) + varint(meta_size) + varint(index_offset) + varint(index_size)
    out.extend(handles + b"\x00" * (40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57))
    return bytes(out)


def write_checkpoint(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes `prefix.index` and `prefix.data-00000-of-00001` holding `tensors`."""
    data = bytearray()
    records = [(b"", header_proto())]
    for name in sorted(tensors, key=lambda n: n.encode()):
        array = np.asarray(tensors[name])
        payload = array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
        records.append((name.encode(), entry_proto(
            _DTYPE_ENUM[array.dtype.name], array.shape, len(data), len(payload),
            mask(crc32c(payload)))))
        data += payload
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(data))
    with open(prefix + ".index", "wb") as f:
        f.write(sstable(records))
