"""Size accounting: one record shape for every model, file and tool, and the safetensors
header it is read from.

Every size report (a torch model, a native artifact, a GGUF file, a peer tool's files) is a
:func:`size_record`, so ``bits_per_weight`` and ``bits_per_weight_total`` are the same
arithmetic everywhere (definitions in :mod:`edgequant.eval.size`). Nothing here imports torch:
``edgequant info`` reads sizes from headers without loading a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

#: ``(dtype, shape, nbytes)`` of one tensor in a safetensors header
TensorEntry = tuple[str, tuple[int, ...], int]
#: safetensors dtypes whose elements are parameters (integer tensors hold codes or indices)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def size_record(*, num_params: int, weight_bytes: int, linear_params: int, linear_bytes: int,
                size_bytes: int | None = None, on_disk: bool = False,
                **extra: Any) -> dict[str, Any]:
    """The size record.

    Args:
        num_params: every parameter of the model (a quantized weight counts out × in).
        weight_bytes: every stored weight byte (tied tensors once).
        linear_params, linear_bytes: the weights ``bits_per_weight`` is over and their bytes
            (the quantized linear layers: codes, scales, zeros, …).
        size_bytes: the weights' bytes on disk; default ``weight_bytes`` (``on_disk`` False).
        extra: further fields of the caller (``layers``, ``tensor_types``, …).
    """
    return {
        "size_bytes": weight_bytes if size_bytes is None else size_bytes,
        "size_on_disk": on_disk,
        "num_params": num_params,
        "bits_per_weight": 8 * linear_bytes / linear_params if linear_params else None,
        "bits_per_weight_total": 8 * weight_bytes / num_params if num_params else None,
        "weight_bytes": weight_bytes,
        **extra,
    }


def safetensors_table(path: Path) -> dict[str, TensorEntry]:
    """``{name: (dtype, shape, nbytes)}`` from a safetensors file's header (no data read).

    The format: an 8-byte little-endian header length, then a JSON header naming each
    tensor's dtype, shape and ``data_offsets``.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), end - start)
    return out
