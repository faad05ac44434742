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
    # other widths: 8 codes fill ``bits`` whole bytes; build each chunk as one int64
    pad = (-n) % 8
    chunks = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    value = (chunks << shifts).sum(dim=1, keepdim=True)          # (n/8, 1), < 2**56
    out = (value >> (torch.arange(bits, dtype=torch.int64, device=flat.device) * 8)) & 0xFF
    return out.reshape(-1)[:packed_nbytes(n, bits)].to(torch.uint8)


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
    # other widths: ``bits`` bytes hold 8 codes; read each chunk as one integer (int32 fits
    # the 24 bits of 3-bit chunks), then cut out its 8 codes
    dt = torch.int32 if bits <= 3 else torch.int64
    chunks = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).view(-1, bits).to(dt)
    value = chunks[:, 0].clone()
    for k in range(1, bits):
        value |= chunks[:, k] << (8 * k)
    out = torch.empty(value.numel(), 8, dtype=torch.uint8, device=packed.device)
    for k in range(8):
        out[:, k] = (value >> (k * bits)) & mask
    return out.reshape(-1)[:n]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise SchemeError(f"packing supports 1–8 bits per code, not {bits}")
