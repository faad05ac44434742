"""Bit packing of 1–8-bit codes into bytes, exact at any length.

Codes are laid out as a little-endian bit stream: code ``i`` occupies bits
``[i*b, (i+1)*b)`` counting from bit 0 of byte 0. For b in {1, 2, 4, 8} this is the
familiar "low bits first" nibble/crumb layout::

    b = 4:  byte k = code[2k] | code[2k+1] << 4
    b = 3:  bytes 0..2 hold codes 0..7:  c0 c0 c0 c1 c1 c1 c2 c2 | c2 c3 c3 c3 c4 c4 c4 c5 | ...
            (bit 0 on the left)

The packed size is ``ceil(n * b / 8)`` bytes; the tail of the last byte is zero.
"""

from __future__ import annotations

import torch

from ..errors import SchemeError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise SchemeError(f"codes out of range for {bits}-bit packing")
    n = flat.numel()
    if 8 % bits == 0:  # whole codes per byte: shift-and-or
        per = 8 // bits
        pad = (-n) % per
        flat = torch.nn.functional.pad(flat, (0, pad)).view(-1, per)
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (flat << shifts).sum(dim=1).to(torch.uint8)
    # general b: expand to bits, regroup by 8
    bit_idx = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> bit_idx) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int32, device=flat.device)).sum(dim=1) \
        .to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise SchemeError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != packed_nbytes(n, bits):
        raise SchemeError(f"{packed.numel()} packed bytes cannot hold exactly {n} "
                          f"{bits}-bit codes (expected {packed_nbytes(n, bits)})")
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    stream = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: n * bits].view(n, bits).to(torch.int32)
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(dim=1) \
        .to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise SchemeError(f"packing supports 1–8 bits per code, not {bits}")
