"""llama.cpp's own encoder (``ggml_quantize_chunk`` in libggml-base), called through ctypes.

The reference for the byte-exact tests; ``load()`` returns None when llama-cpp-python (which
ships the library) is not installed.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@functools.cache
def load() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    if not found:
        return None
    lib = ctypes.CDLL(str(found[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix
    ]
    return lib


def quantize(
    data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """``ggml_quantize_chunk`` on float32 rows -> uint8 ``(rows, bytes_per_row)``."""
    lib = load()
    assert lib is not None, "libggml-base not available"
    src = np.ascontiguousarray(data, dtype=np.float32)
    rows, n = src.shape
    block, size = GGML_QUANT_SIZES[qtype]
    dst = np.zeros((rows, n // block * size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        int(qtype),
        src.ctypes.data,
        dst.ctypes.data,
        0,
        rows,
        n,
        None if qw is None else qw.ctypes.data,
    )
    assert written == dst.size
    return dst
