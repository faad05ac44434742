"""Compute dtypes: float32, or bfloat16 where the CPU multiplies it natively.

Shared by calibration (its forwards run under autocast in this dtype) and the speed test
(the dtype a runtime would deploy in). ``auto`` picks bfloat16 only where it is fast: on a
CPU without AMX or AVX512-BF16, bf16 matmuls are emulated and slower than float32.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_compute_dtype(name: str, error: type[Exception] = ValueError,
                          what: str = "compute dtype") -> torch.dtype:
    """``auto`` → bfloat16 when the CPU has native bf16 matmuls, else float32."""
    if name not in COMPUTE_DTYPES:
        raise error(f"{what} must be one of {', '.join(COMPUTE_DTYPES)}, not {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return getattr(torch, name)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
