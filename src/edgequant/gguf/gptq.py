"""GPTQ-style error feedback into GGML grids (``export(..., gptq=True)``).

llama.cpp quantizes every GGML block on its own: the rounding error of one block is never
compensated elsewhere. GPTQ (Frantar et al., 2022) compensates it: after a group of columns
``B`` is fixed to its codes, the remaining columns ``R`` are updated so that the layer's
output on the calibration inputs changes least. With ``H = Σ x xᵀ`` (damped) and the upper
Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), fixing ``B`` with error ``E = W_B − Q_B`` is
compensated by

    W_R ← W_R − E · U_BB⁻¹ · U_BR

(the block form of GPTQ's column update; for a single column it is the paper's
``err / U_jj · U_j,R``). Here a group is one GGML block of columns — 32 for Q4_0…Q8_0,
256 for the K-quants — because the GGML encoder chooses its scales for a whole block at once:
each block is encoded by our byte-exact encoder (the same code path llama.cpp uses with an
importance matrix, the search weighted by ``diag(H)/n`` and by the block's current values),
and the error fed forward is the error of exactly the bytes written. The file stays a plain
GGUF of the same types; only the codes differ from llama.cpp's.

The Hessians are collected once on the original model (not block by block on the already
quantized one, as the GPTQ reference does): cheaper, and the same statistics as the
importance matrix.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import GGUFError
from . import quants

__all__ = ["gptq_encode"]


def gptq_encode(W: np.ndarray, qtype: GGMLQuantizationType, H: np.ndarray,
                imatrix: np.ndarray | None = None, damp: float = 0.01) -> np.ndarray:
    """Encode ``W`` ``(rows, n)`` into ``qtype`` blocks with GPTQ error feedback.

    Args:
        W: float32 weights, one output row per row.
        qtype: a quantized GGML type (float types are returned as plain encodings).
        H: ``(n, n)`` Hessian proxy ``Σ x xᵀ`` of the layer's inputs (any positive scale).
        imatrix: column weights for the encoder's scale search (default ``diag(H)``,
            normalised; llama.cpp's importance matrix is ``diag(H) / tokens``).
        damp: added to the diagonal, relative to its mean (GPTQ's ``percdamp``).

    Returns:
        uint8 ``(rows, bytes_per_row)``, the layout :func:`quants.quantize` returns.
    """
    enc = quants.encoder_for(qtype)
    rows, n = W.shape
    bs = enc.block_size
    if enc.block_size == 1 or n % bs:
        return quants.quantize(W, qtype, imatrix)
    if H.shape != (n, n):
        raise GGUFError(f"Hessian of shape {H.shape} for a weight with {n} columns")
    H = np.array(H, dtype=np.float64)
    W = np.array(W, dtype=np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if imatrix is None:
        imatrix = np.diag(H) / max(float(np.mean(np.diag(H))), 1e-30)
    qw = np.asarray(imatrix, dtype=np.float32)
    H[np.diag_indices(n)] += damp * float(np.mean(np.diag(H)))
    U = _inverse_cholesky_upper(H)  # H⁻¹ = UᵀU
    out = np.empty((rows, n // bs * enc.type_size), dtype=np.uint8)
    for c0 in range(0, n, bs):
        c1 = c0 + bs
        current = W.astype(np.float32)
        weights = enc.search_weights(current, qw)  # per-row statistics over the whole row
        slab = np.ascontiguousarray(current[:, c0:c1])
        blocks = enc.quantize_blocks(slab.reshape(-1, bs), None if weights is None else
                                     np.ascontiguousarray(weights[:, c0:c1]).reshape(-1, bs))
        out[:, c0 // bs * enc.type_size: c1 // bs * enc.type_size] = blocks.reshape(rows, -1)
        if c1 < n:
            Q = quants.dequantize(blocks, qtype).reshape(rows, bs).astype(np.float64)
            E = W[:, c0:c1] - Q  # (rows, bs)
            X = np.linalg.solve(U[c0:c1, c0:c1].T, E.T).T  # X · U_BB = E
            W[:, c1:] -= X @ U[c0:c1, c1:]
    return out


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``H⁻¹ = UᵀU``; more damping if ``H`` is not positive definite."""
    n = H.shape[0]
    eye = np.eye(n)
    extra = 0.0
    for _ in range(6):
        try:
            L = np.linalg.cholesky(H + extra * eye)
            Linv = np.linalg.solve(L, eye)
            Hinv = Linv.T @ Linv
            return np.linalg.cholesky(Hinv).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))))
    raise GGUFError("the Hessian is not positive definite even with extra damping; use more "
                    "calibration data")
