"""The GGUF container read in one pass: metadata as Python values, tensors as byte views of the file.

``gguf.GGUFReader`` builds a numpy memmap slice for every part of every metadata
value, which for a 49,152-entry vocabulary and its merges is ~100,000 strings and
~4 s of a model's first load. Here each string is a ``struct`` read from one
``bytes`` of the metadata, and numeric arrays are a single ``np.frombuffer``; the
tensor data stays memory-mapped. Layout (little-endian GGUF v2 / v3): magic,
version, tensor count, metadata count; metadata (key, type, value); tensor infos
(name, dims fastest first, ggml type, offset); the data, aligned to
``general.alignment`` (32 by default).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Metadata value types: the numeric ones by their struct code; 7 bool, 8 string, 9 array.
_NUMERIC = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands (wrong magic, version, truncated, bad type)."""


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # dims as the file lists them: fastest first
    tensor_type: int  # ggml type id (``gguf.GGMLQuantizationType``)
    data: np.ndarray  # uint8 [rows, bytes per row] view of the file (rows: the product of the dims after the first)


class GGUFFile(NamedTuple):
    version: int
    fields: dict  # key -> int | float | bool | str | list
    tensors: list[GGUFTensor]


class _Cursor:
    """Reads little-endian values from ``buffer`` at a moving offset; overruns raise GGUFFormatError."""

    def __init__(self, buffer, offset: int = 0):
        self.buffer, self.offset = buffer, offset

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        if self.offset + size > len(self.buffer):
            raise GGUFFormatError(f"truncated at byte {self.offset}")
        value = struct.unpack_from("<" + code, self.buffer, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFFormatError(f"a string of {length} bytes runs past the end of the file")
        raw, self.offset = bytes(self.buffer[self.offset:end]), end
        return raw.decode("utf-8")

    def value(self, kind: int):
        if kind in _NUMERIC:
            return self.unpack(_NUMERIC[kind])
        if kind == _BOOL:
            return bool(self.unpack("B"))
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self.offset}")

    def array(self) -> list:
        kind, count = self.unpack("I"), self.unpack("Q")
        if kind in _NUMERIC:  # one read for the whole array
            dtype = np.dtype("<" + _NUMERIC[kind])
            end = self.offset + count * dtype.itemsize
            if end > len(self.buffer):
                raise GGUFFormatError(f"an array of {count} values runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset = end
            return values
        return [self.value(kind) for _ in range(count)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parses ``path``'s header, metadata and tensor infos; tensor data are views of a memory map."""
    with open(path, "rb") as handle:
        try:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as err:  # an empty file cannot be mapped
            raise GGUFFormatError(f"cannot map the file ({err})") from None
    cursor = _Cursor(buffer)
    if len(buffer) < 4 or buffer[:4] != MAGIC:
        raise GGUFFormatError(f"no GGUF magic (starts with {bytes(buffer[:4])!r})")
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"GGUF version {version} (as little-endian) is not supported; "
                              f"this reader knows {SUPPORTED_VERSIONS}")
    tensor_count, field_count = cursor.unpack("Q"), cursor.unpack("Q")
    fields = {}
    for _ in range(field_count):
        key = cursor.string()
        fields[key] = cursor.value(cursor.unpack("I"))
    infos = [_tensor_info(cursor) for _ in range(tensor_count)]
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.offset // alignment) * alignment
    return GGUFFile(version, fields, [_tensor(buffer, data_start, *info) for info in infos])


def _tensor_info(cursor: _Cursor) -> tuple:
    name = cursor.string()
    dims = tuple(cursor.unpack("Q") for _ in range(cursor.unpack("I")))
    return name, dims, cursor.unpack("I"), cursor.unpack("Q")


def _tensor(buffer, data_start: int, name: str, dims: tuple, kind: int, offset: int) -> GGUFTensor:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {kind}") from None
    if not dims or dims[0] % block_size:
        raise GGUFFormatError(f"tensor {name!r}: dims {dims} do not split into blocks of {block_size}")
    rows, row_bytes = int(np.prod(dims[1:], dtype=np.int64)), dims[0] // block_size * type_size
    start = data_start + offset
    if start + rows * row_bytes > len(buffer):
        raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
    data = np.frombuffer(buffer, np.uint8, rows * row_bytes, start).reshape(rows, row_bytes)
    return GGUFTensor(name, dims, kind, data)
