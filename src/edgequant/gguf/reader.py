"""Validate a GGUF file before anything trusts it: header, metadata, tensor table, sizes.

:func:`inspect_gguf` walks the file the way ``gguf_init_from_file`` in ggml does and stops at
the first thing that is wrong, naming it: a bad magic or version, a key or tensor entry that
runs past the end, a tensor type GGML does not know, a row length its block does not divide,
or tensor data beyond the end of the file (a truncated download). Nothing is memory-mapped;
tensor data is never read.

Layout (GGUF v2/v3, little-endian)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv   × ( str key | u32 type | value )            str = u64 length + UTF-8 bytes
    n_tensors × ( str name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset )
    padding to general.alignment (default 32)
    tensor data, each at data_start + offset

Example:
    >>> info = inspect_gguf("model.gguf")
    >>> info.arch, info.tensors[0].type.name
    ('llama', 'Q8_0')
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFError

__all__ = ["GGUFInfo", "TensorEntry", "inspect_gguf"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_COUNT = 1 << 24  # entries; anything larger is a corrupt count, not a model
_MAX_STR = 1 << 30
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table. ``shape`` is numpy order (``ne`` reversed)."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFInfo:
    """What a valid GGUF file holds (metadata values, the tensor table, sizes)."""

    path: Path
    version: int
    kv: dict[str, Any]
    tensors: list[TensorEntry]
    data_offset: int
    file_size: int
    alignment: int = 32
    types: dict[str, GGUFValueType] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def inspect_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check a GGUF file's header, metadata and tensor table.

    Raises:
        GGUFError: the file is missing, not GGUF, truncated or corrupt, or holds a tensor type
            GGML does not know; the message names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        try:
            return _parse(r, path, size)
        except (struct.error, UnicodeDecodeError, OverflowError) as e:
            raise GGUFError(f"{path} is corrupt near byte {r.pos}: {e}; fetch or export it "
                            "again") from None


def _parse(r: _Reader, path: Path, size: int) -> GGUFInfo:
    if r.read(4) != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (no 'GGUF' magic at the start)")
    version = r.scalar("<I")
    if version not in _VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise GGUFError(f"{path} is corrupt: it claims {n_tensors} tensors and {n_kv} keys")
    kv: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        key = r.string(f"key #{i}")
        vtype = r.value_type(f"key {key!r}")
        kv[key], types[key] = r.value(vtype, f"key {key!r}"), vtype
    alignment = int(kv.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path} has general.alignment={alignment}, not a power of two")
    entries = [_tensor_info(r, path, i) for i in range(n_tensors)]
    data_offset = -(-r.pos // alignment) * alignment
    names = set()
    for t in entries:
        if t.name in names:
            raise GGUFError(f"{path} is corrupt: tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % alignment:
            raise GGUFError(f"{path} is corrupt: tensor {t.name!r} is not aligned to "
                            f"{alignment} bytes")
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} ends at byte {end:,} but "
                            f"the file has {size:,} bytes; fetch or export it again")
    return GGUFInfo(path, int(version), kv, entries, data_offset, size, alignment, types)


def _tensor_info(r: _Reader, path: Path, i: int) -> TensorEntry:
    name = r.string(f"tensor #{i} name")
    n_dims = r.scalar("<I")
    if not 1 <= n_dims <= 4:
        raise GGUFError(f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions")
    ne = [r.scalar("<Q") for _ in range(n_dims)]
    raw = r.scalar("<I")
    offset = r.scalar("<Q")
    try:
        qtype = GGMLQuantizationType(raw)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"{path}: tensor {name!r} has unknown tensor type {raw}; this file "
                        "needs a newer reader, or it is corrupt") from None
    if any(d < 0 for d in ne) or ne[0] % block:
        raise GGUFError(f"{path} is corrupt: tensor {name!r} of type {qtype.name} has row "
                        f"length {ne[0]}, not a multiple of its block size {block}")
    n = 1
    for d in ne:
        n *= d
    return TensorEntry(name, qtype, tuple(reversed(ne)), offset, n // block * type_size)


class _Reader:
    """Sequential little-endian reads that fail clearly at the end of the file."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def read(self, n: int, what: str = "the header") -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path} is truncated or corrupt: reading {what} needs bytes "
                            f"up to {self.pos + n:,}, the file has {self.size:,}")
        b = self.f.read(n)
        self.pos += n
        return b

    def scalar(self, fmt: str, what: str = "the header") -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > _MAX_STR:
            raise GGUFError(f"{self.path} is corrupt: {what} claims a {n:,}-byte string")
        return self.read(n, what).decode("utf-8")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f"{self.path} is corrupt: {what} has unknown value type {raw}"
                            ) from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            item = self.value_type(what)
            n = self.scalar("<Q", what)
            if n > _MAX_COUNT * 16:
                raise GGUFError(f"{self.path} is corrupt: {what} claims {n:,} items")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                width = struct.calcsize(fmt)
                raw = self.read(width * n, what)
                return list(struct.unpack(f"<{n}{fmt[1]}", raw))
            return [self.value(item, what) for _ in range(n)]
        return self.scalar(_SCALARS[vtype], what)
