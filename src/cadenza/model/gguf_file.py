"""A fast reader of a GGUF file's metadata and tensor index, over one ``mmap``.

``gguf.GGUFReader`` builds a numpy memmap view for every part of every field, so a model with a
49k-token vocabulary (two 49k-string arrays: tokens and merges) spends about five seconds of
every start-up parsing them. This reader walks the same layout with ``struct`` over the mapped
bytes and offers what the loader and the tokenizer use, in the reader's shapes: ``fields`` (each
with ``contents()``, the same Python values) and ``tensors`` (``name``, ``tensor_type``,
``shape``, ``n_elements`` and ``data``, a zero-copy numpy view of the file laid out as the
reader lays it out). Files it does not handle (big-endian, nested arrays) raise
``UnsupportedGGUF``; ``open_gguf`` then falls back to ``gguf.GGUFReader``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
)
from gguf.quants import quant_shape_to_byte_shape

V = GGUFValueType
# The scalar value types: struct format of one, numpy dtype of an array of them.
_SCALARS: dict[int, tuple[str, str]] = {
    V.UINT8: ("<B", "<u1"),
    V.INT8: ("<b", "<i1"),
    V.UINT16: ("<H", "<u2"),
    V.INT16: ("<h", "<i2"),
    V.UINT32: ("<I", "<u4"),
    V.INT32: ("<i", "<i4"),
    V.FLOAT32: ("<f", "<f4"),
    V.BOOL: ("<?", "?"),
    V.UINT64: ("<Q", "<u8"),
    V.INT64: ("<q", "<i8"),
    V.FLOAT64: ("<d", "<f8"),
}
# Element types whose data is plain numbers (the rest are quantised blocks, read as bytes).
_PLAIN = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class UnsupportedGGUF(ValueError):
    """A valid GGUF layout this reader leaves to ``gguf.GGUFReader``."""


@dataclass(frozen=True)
class Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # GGUF dimension order (innermost first), as the reader gives it
    n_elements: int
    data: np.ndarray


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if len(buf) < 24 or struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version & 0xFFFF == 0:
            raise UnsupportedGGUF("a big-endian GGUF file")
        if version not in (2, 3):
            raise UnsupportedGGUF(f"GGUF version {version}")
        self._offset = 24
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.fields[key] = Field(self._value(kind))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", Field(GGUF_DEFAULT_ALIGNMENT)).value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid GGUF alignment {alignment!r}")
        start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    # ------------------------------------------------------------------ parsing
    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._map, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        start = self._offset
        self._offset += n
        return self._map[start : start + n].decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == V.STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind][0])[0]  # a float32 widens exactly
        if kind != V.ARRAY:
            raise UnsupportedGGUF(f"GGUF value type {kind}")
        item, count = self._unpack("<IQ")
        if item == V.STRING:
            return [self._string() for _ in range(count)]
        if item not in _SCALARS:
            raise UnsupportedGGUF(f"a GGUF array of type {item}")
        dtype = np.dtype(_SCALARS[item][1])
        values = np.frombuffer(self._map, dtype, count, self._offset).tolist()
        self._offset += dtype.itemsize * count
        return values

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = list(self._unpack(f"<{n_dims}Q"))
        kind, offset = self._unpack("<IQ")
        return name, dims, kind, offset

    def _tensor(self, start: int, name: str, dims: list[int], kind: int, offset: int) -> Tensor:
        qtype = GGMLQuantizationType(kind)
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        np_dims = tuple(reversed(dims))
        plain = _PLAIN.get(qtype)
        if plain is not None:
            data = np.frombuffer(self._map, plain, n_elements, start + offset).reshape(np_dims)
        else:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elements * type_size // block
            data = np.frombuffer(self._map, np.uint8, n_bytes, start + offset)
            data = data.reshape(quant_shape_to_byte_shape(np_dims, qtype))
        shape = np.array(dims, dtype=np.uint64)
        return Tensor(name, qtype, shape, n_elements, data)


def open_gguf(path: str | Path) -> GGUFFile | GGUFReader:
    """The file's metadata and tensors: this module's reader, or ``gguf.GGUFReader`` for a
    layout it leaves to the library."""
    try:
        return GGUFFile(path)
    except UnsupportedGGUF:
        return GGUFReader(path)
