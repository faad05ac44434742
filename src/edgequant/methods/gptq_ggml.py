"""GPTQ into GGML block formats (``export(..., gptq=True)``): an encoder for :func:`gptq_solve`.

llama.cpp quantizes every GGML block on its own: the rounding error of one block is never
compensated elsewhere. GPTQ compensates it. Here a GPTQ group is one GGML block of columns —
32 for Q4_0…Q8_0, 256 for the K-quants — because the GGML encoder chooses a block's scales and
codes together: each slab of columns is encoded by our byte-exact encoder (the code path
llama.cpp uses with an importance matrix, its search weighted by the imatrix and by each row's
current values), and the error fed forward (``W_R −= E·U_BB⁻¹·U_BR``) is the error of exactly
the bytes written. The file stays a plain GGUF of the same types; only the codes differ from
llama.cpp's.

The search weights of the legacy types depend on the whole row (its mean square), so they are
recomputed from the current, error-updated row before every slab; that is why the lazy batch
of this encoder is one block. GGUF stores no ``g_idx``, so act-order is refused.

The Hessians are collected once on the original model (not block by block on the already
quantized one, as the GPTQ reference does): cheaper, and the same statistics as the
importance matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..errors import GGUFError, SchemeError
from ..gguf import quants
from .gptq import GPTQConfig, gptq_solve
from .gptq_encoders import GroupEncoder

__all__ = ["GGMLEncoder", "gptq_encode"]


class GGMLEncoder(GroupEncoder[np.ndarray]):
    """Round slabs of one GGML block of columns with the numpy encoder of ``qtype``.

    Args:
        qtype: a quantized GGML type whose block divides the row length.
        imatrix: per-column weights of the encoder's search (llama.cpp's importance matrix,
            ``diag(H)/tokens`` or any positive multiple); None: the unweighted search.

    The result is the uint8 ``(rows, bytes_per_row)`` layout :func:`quants.quantize` returns.
    """

    def __init__(self, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> None:
        self.enc = quants.encoder_for(qtype)
        if self.enc.block_size == 1:
            raise GGUFError(f"{self.enc.qtype.name} is a float type: there is no rounding for "
                            "GPTQ to compensate; encode it with quants.quantize")
        self.qw = None if imatrix is None else np.asarray(imatrix, dtype=np.float32).reshape(-1)
        if self.qw is not None and not np.isfinite(self.qw).all():
            raise GGUFError("imatrix contains NaN or Inf values")

    def check(self, config: GPTQConfig) -> None:
        if config.act_order:
            raise SchemeError("act_order needs a g_idx to undo the column order, and GGUF files "
                              "have none (llama.cpp reads columns in order): use gptq without "
                              "act_order for GGML types")
        if config.static_groups or config.mse_clip:
            raise SchemeError("static_groups and mse_clip are options of native schemes; a GGML "
                              "encoder chooses each block's scales itself: leave them off")

    def group_width(self, n_cols: int) -> int:
        return self.enc.block_size

    def lazy_block(self, block_size: int, n_cols: int) -> int:
        return self.enc.block_size  # the search weights read the whole, current row

    def begin(self, W: torch.Tensor, perm: torch.Tensor | None) -> None:
        assert perm is None, "check() refuses act_order"
        rows, n = W.shape
        bs, ts = self.enc.block_size, self.enc.type_size
        if n % bs:
            raise GGUFError(f"row length {n} is not a multiple of the {self.enc.qtype.name} "
                            f"block size {bs}; encode it with quants.quantize (a smaller type)")
        if self.qw is not None and self.qw.shape != (n,):
            raise GGUFError(f"imatrix has {self.qw.size} entries, expected one per column ({n})")
        self.out = np.empty((rows, n // bs * ts), dtype=np.uint8)

    def round_group(self, W: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        bs, ts = self.enc.block_size, self.enc.type_size
        current = W.detach().cpu().numpy()                              # (R, C) float32
        slab = np.ascontiguousarray(current[:, j0:j1]).reshape(-1, bs)  # (R, bs)
        weights = None
        if self.qw is not None:
            full = self.enc.search_weights(current, self.qw)  # per-row statistics: whole row
            if full is not None:
                weights = np.ascontiguousarray(full[:, j0:j1]).reshape(-1, bs)
        blocks = self.enc.quantize_blocks(slab, weights)                # (R, ts) uint8
        self.out[:, j0 // bs * ts:j1 // bs * ts] = blocks
        Q = quants.dequantize(blocks, self.enc.qtype).reshape(W.shape[0], bs)
        return torch.from_numpy(Q).to(W.device)

    def finish(self) -> np.ndarray:
        return self.out


def gptq_encode(W: np.ndarray, qtype: GGMLQuantizationType, H: np.ndarray,
                imatrix: np.ndarray | None = None, config: GPTQConfig | None = None
                ) -> np.ndarray:
    """Encode ``W`` ``(rows, n)`` into ``qtype`` blocks with GPTQ error feedback.

    Args:
        W: weights, one output row per row.
        qtype: a GGML type. Float types, and rows the type's block does not divide, are
            encoded plainly by :func:`quants.quantize` (nothing to compensate / no blocks).
        H: ``(n, n)`` Hessian proxy ``Σ x xᵀ`` of the layer's inputs (any positive scale).
        imatrix: column weights for the encoder's search (default ``diag(H)``, normalised;
            llama.cpp's importance matrix is ``diag(H) / tokens``).
        config: GPTQ options (damping; act_order, static_groups and mse_clip are refused).

    Returns:
        uint8 ``(rows, bytes_per_row)``, the layout :func:`quants.quantize` returns.

    Raises:
        HessianError: ``H`` is not positive definite even with ``config.damp_max`` damping.
        SchemeError: options a GGML type cannot honour (act_order …).
    """
    enc = quants.encoder_for(qtype)
    W = np.asarray(W)
    if W.ndim != 2:
        raise GGUFError(f"gptq encodes 2-D weights, not shape {W.shape}")
    n = W.shape[1]
    if enc.block_size == 1 or n % enc.block_size:
        return quants.quantize(W, qtype, imatrix)
    H = np.asarray(H)
    if H.shape != (n, n):
        raise GGUFError(f"Hessian of shape {H.shape} for a weight with {n} columns")
    if imatrix is None:  # dead inputs (diag 0) count as 1, as the solver's fix makes them
        d = np.diag(H).astype(np.float64)
        d = np.where(d == 0, 1.0, d)
        imatrix = d / max(float(d.mean()), 1e-30)
    Wt = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32))
    Ht = torch.from_numpy(np.ascontiguousarray(H))
    out, _ = gptq_solve(Wt, Ht, GGMLEncoder(qtype, imatrix), config)
    return out
