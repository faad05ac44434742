"""GGML tensor encoders in numpy, byte-for-byte what llama.cpp writes.

Each GGML type is one small class with a pure ``quantize_blocks(blocks, weights=None)``;
decoding is delegated to gguf-py's decoders (``gguf.quants.dequantize``). Classes register
themselves by ``GGMLQuantizationType``; a class without an encoder, or a type gguf-py cannot
decode, fails when the class is defined, not when it is first used.

The K-quant encoders follow ``ggml-quants.c`` (llama.cpp as vendored by llama-cpp-python
0.3.36) step by step, including its float32 evaluation order, because the scale searches
compare float sums and one rounding difference changes the chosen codes:

* sums run sequentially in float32 (``np.cumsum`` along a block is a sequential
  recurrence; ``np.sum`` is pairwise and would not match);
* ``nearest_int`` is ggml's ``x + 1.5 * 2**23`` bit trick, reproduced bit for bit;
* integers stored in ``uint8_t``/``int8_t`` in the C wrap the same way here.

Which search runs mirrors ``ggml_quantize_chunk``: without an importance matrix every type
uses its ``quantize_row_*_ref`` path (``quantize_q4_K(..., quant_weights=NULL)`` calls
``quantize_row_q4_K_ref``, and ``llama_model_quantize`` passes NULL when no imatrix is
given); with one, the ``quantize_row_*_impl`` path with weights derived from the imatrix.
Everything is vectorised over blocks; Python loops run only over the candidate scales of a
search and over the elements of one block in the coordinate-descent refinements.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from edgequant.errors import GGUFError

__all__ = ["BlockEncoder", "dequantize", "encoder_for", "quantize", "supported_types"]

QT = GGMLQuantizationType
QK_K = 256
F32 = np.float32
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_MAGIC = F32(12582912.0)  # 1.5 * 2**23, nearest_int's rounding constant
_CHUNK_ELEMENTS = 1 << 20  # rows are encoded in chunks of about this many values

_REGISTRY: dict[GGMLQuantizationType, type[BlockEncoder]] = {}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The GGML types this module can encode, in enum order."""
    return tuple(sorted(_REGISTRY, key=int))


def encoder_for(qtype: GGMLQuantizationType) -> type[BlockEncoder]:
    """The registered encoder class of ``qtype``; GGUFError if there is none."""
    try:
        return _REGISTRY[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        names = ", ".join(t.name for t in supported_types())
        raise GGUFError(f"no encoder for GGML type {qtype!r}; supported: {names}") from None


def quantize(
    data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Encode float rows as GGML blocks, exactly as llama.cpp's ``ggml_quantize_chunk`` does.

    Args:
        data: float32 array ``(rows, n_per_row)`` (any leading shape; the last axis is a row).
        qtype: target type, one of ``supported_types()``.
        imatrix: optional importance matrix ``(n_per_row,)`` (llama.cpp's per-column
            ``quant_weights``). Types whose llama.cpp encoder ignores it (F32, F16, BF16,
            Q8_0) ignore it too.

    Returns:
        uint8 array ``(rows, n_per_row // block_size * type_size)`` holding the blocks of each
        row: the layout ``gguf.quants.quantize`` returns for quantized types, and the raw
        little-endian element bytes for F32/F16/BF16.

    Example:
        >>> q = quantize(np.ones((2, 256), np.float32), GGMLQuantizationType.Q4_K)
        >>> q.shape
        (2, 144)
    """
    enc = encoder_for(qtype)
    rows = np.asarray(data)
    if rows.ndim < 1 or rows.shape[-1] == 0:
        raise GGUFError(f"cannot quantize an array of shape {rows.shape}: expected (rows, n)")
    n = rows.shape[-1]
    if n % enc.block_size:
        raise GGUFError(
            f"row length {n} is not a multiple of the {enc.qtype.name} block size "
            f"{enc.block_size}; pick a type with a smaller block (see edgequant.gguf.mixtures)"
        )
    rows = rows.astype(F32, copy=False).reshape(-1, n)
    if not np.isfinite(rows).all():
        raise GGUFError("cannot quantize NaN or Inf values; check the source weights")
    qw = None
    if imatrix is not None:
        qw = np.asarray(imatrix, dtype=F32).reshape(-1)
        if qw.shape != (n,):
            raise GGUFError(f"imatrix has {qw.size} entries, expected one per column ({n})")
        if not np.isfinite(qw).all():
            raise GGUFError("imatrix contains NaN or Inf values")
    per_row = n // enc.block_size * enc.type_size
    out = np.empty((rows.shape[0], per_row), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // n)
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step]
        weights = enc.search_weights(chunk, qw) if qw is not None else None
        blocks = chunk.reshape(-1, enc.block_size)
        wblocks = None if weights is None else weights.reshape(-1, enc.block_size)
        out[r0 : r0 + step] = enc.quantize_blocks(blocks, wblocks).reshape(chunk.shape[0], per_row)
    return out.reshape(*np.shape(data)[:-1], per_row)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Decode GGML blocks (uint8 rows as ``quantize`` returns) to float32 rows via gguf-py."""
    enc = encoder_for(qtype)
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.shape[-1] % enc.type_size:
        raise GGUFError(
            f"{raw.shape[-1]} bytes per row is not a whole number of {enc.qtype.name} blocks"
        )
    return np.asarray(gguf_quants.dequantize(raw, enc.qtype), dtype=F32)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


class BlockEncoder:
    """One GGML type: a pure block encoder, plus gguf-py's decoder.

    Subclasses set ``qtype`` through the class statement (``class Q8_0(BlockEncoder,
    qtype=QT.Q8_0)``) and define ``quantize_blocks``; registration fails if either half is
    missing.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object):
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an abstract helper base
            return
        if "quantize_blocks" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} registers {qtype.name} without quantize_blocks")
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        try:
            probe = gguf_quants.dequantize(np.zeros((1, cls.type_size), np.uint8), qtype)
        except NotImplementedError as err:
            raise TypeError(f"gguf-py has no decoder for {qtype.name}") from err
        if np.size(probe) != cls.block_size:
            raise TypeError(f"gguf-py decodes a {qtype.name} block to {np.size(probe)} values")
        if qtype in _REGISTRY:
            raise TypeError(f"{qtype.name} is registered twice")
        _REGISTRY[qtype] = cls

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """``(n_blocks, block_size)`` float32 -> ``(n_blocks, type_size)`` uint8.

        ``weights`` are the per-element weights of llama.cpp's importance-weighted search (what
        ``search_weights`` derives from an imatrix), or None for the reference path.
        """
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """``(n_blocks, type_size)`` uint8 -> ``(n_blocks, block_size)`` float32 (gguf-py)."""
        return dequantize(blocks, cls.qtype).reshape(-1, cls.block_size)

    @classmethod
    def search_weights(cls, rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray | None:
        """Per-element search weights llama.cpp derives from ``imatrix`` for ``rows`` (r, n).

        None means the llama.cpp encoder of this type ignores the importance matrix.
        """
        return None


# ---------------------------------------------------------------------------------------------
# ggml-quants.c helpers, vectorised over the first axis (one row = one block or sub-block)
# ---------------------------------------------------------------------------------------------


def _quiet(fn):
    """Run ``fn`` with numpy's float warnings off: the C divides by zero in lanes it then
    discards, and so do these vectorised searches."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even through the float adder), bit for bit, as int32."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for (...) s += a[i];`` over the last axis, in float32 and in order."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1] + F32(0)


def _colsum(a: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """The same sequential sum over axis 0 of an element-major ``(n, B)`` array.

    The searches below keep blocks in columns so that each of these sums is ``n`` vector adds
    (np.cumsum along a short last axis is an order of magnitude slower). ``from_zero=False``
    starts from ``a[0]`` instead of ``0 + a[0]``, which differs only in the sign of zero.
    """
    s = a[0] + F32(0) if from_zero else a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _pick(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, index[:, None], axis=1)[:, 0]


def _absmax(v: np.ndarray) -> np.ndarray:
    """``amax = 0; if (fabsf(v[i]) > amax) { amax = fabsf(v[i]); max = v[i]; }`` -> max.

    The first element of largest magnitude, keeping its sign; 0 if none beats 0 (NaNs never
    do, as in the C).
    """
    a = np.abs(v)
    a = np.where(np.isnan(a), F32(-1), a)
    i = np.argmax(a, axis=1)
    return np.where(_pick(a, i) > 0, _pick(v, i), F32(0))


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as ``(n, 2)`` little-endian bytes."""
    return np.asarray(v, dtype=F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value an fp16 field reads back as."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def _seq_sq(x: np.ndarray) -> np.ndarray:
    return _seq(x * x)


def _cols(a: np.ndarray) -> np.ndarray:
    """``(B, n)`` blocks -> element-major ``(n, B)``."""
    return np.ascontiguousarray(a.T)


# The four searches take and return blocks as rows ``(B, n)``, and work on columns inside.


@_quiet
def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search.

    Returns ``(scale (B,), L (B, n) int32 in [0, 2*nmax))``. Weights default to ``x**2``.
    """
    xmax = _absmax(x)
    zero = np.abs(xmax) < _EPS
    xmax = np.where(zero, F32(1), xmax)
    xt = _cols(x)
    w = xt * xt if qw is None else _cols(qw)
    wx = w * xt

    def fit(iscale):
        l = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l + nmax, _colsum(wx * lf), _colsum(w * lf * lf)

    L, sumlx, suml2 = fit(F32(-nmax) / xmax)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in (s for s in range(-9, 10) if s):
        Lc, slx, sl2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / xmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better, Lc, L)
        scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L).T


@_quiet
def make_q3_quants(x: np.ndarray, nmax: int):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: weights ``x**2`` + coordinate descent."""
    xmax = _absmax(x)
    zero = np.abs(xmax) < _EPS
    xmax = np.where(zero, F32(1), xmax)
    xt = _cols(x)
    w = xt * xt
    wx = w * xt
    L = np.clip(_nearest_int((F32(-nmax) / xmax) * xt), -nmax, nmax - 1)
    lf = L.astype(F32)
    sumlx, suml2 = _colsum(wx * lf), _colsum(w * lf * lf)
    # C stops early when a pass changes nothing; a pass that changes nothing leaves the state
    # as it was, so running all five passes gives the same result.
    for _ in range(5):
        for i in range(xt.shape[0]):
            wi, xi, li = w[i], xt[i], L[i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
            take = (slx > 0) & (new != L[i])
            nf = new.astype(F32)
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax).T


@_quiet
def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (same search): asymmetric scale + min.

    Returns ``(scale (B,), the_min (B,), L (B, n) int32 in [0, nmax])``; a value decodes as
    ``scale * L - the_min``.
    """
    lo = _pick(x, np.argmin(x, axis=1))
    hi = _pick(x, np.argmax(x, axis=1))
    lo = np.where(lo > 0, F32(0), lo)
    flat = ~(hi > lo)
    xt, wt = _cols(x), _cols(w)
    sum_w = _colsum(wt, from_zero=False)  # C starts from weights[0], not 0
    sum_x = _colsum(wt * xt, from_zero=False)

    def codes(iscale, mn):
        return np.clip(_nearest_int(iscale * (xt - mn)), 0, nmax).astype(F32)

    def error(scale, mn, lf):
        diff = scale * lf + mn - xt
        return _colsum(wt * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    Lf = codes(iscale, lo)
    best = error(scale, lo, Lf)
    for step in range(nstep + 1):
        Laux = codes((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo), lo)
        wl = wt * Laux
        sum_l, sum_l2, sum_xl = _colsum(wl), _colsum(wl * Laux), _colsum(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, Laux)
        better = (D > 0) & (cur < best)
        Lf = np.where(better, Laux, Lf)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    L = np.where(flat, 0, Lf.astype(np.int32)).T
    return np.where(flat, F32(0), scale), -lo, L


@_quiet
def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """``make_qp_quants``: positive scales of scales, weighted, with coordinate descent.

    Returns ``(scale (B,), L (B, n) as the C's uint8_t array holds it)``.
    """
    xt, wt = _cols(x), _cols(qw)
    xmax = np.zeros(xt.shape[1], F32)
    for row in xt:  # MAX(max, x[i]) = max > x[i] ? max : x[i], NaNs included
        xmax = np.where(xmax > row, xmax, row)
    zero = xmax < _EPS
    xmax = np.where(zero, F32(1), xmax)
    wx = wt * xt
    iscale = F32(nmax) / xmax
    L8 = (_nearest_int(iscale * xt) & 0xFF).astype(F32)  # stored in uint8_t
    diff = xt - (F32(1) / iscale) * L8
    best = _colsum(wt * diff * diff)
    for step in (s for s in range(-4, 5) if s):
        cand = (F32(0.1) * F32(step) + F32(nmax)) / xmax
        l = np.minimum(nmax, _nearest_int(cand * xt)).astype(F32)
        diff = xt - (F32(1) / cand) * l
        mse = _colsum(wt * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, cand, iscale)
    l = np.minimum(nmax, _nearest_int(iscale * xt))
    lf = l.astype(F32)
    sumlx, suml2 = _colsum(wx * lf), _colsum(wt * lf * lf)
    L = l & 0xFF
    for _ in range(5):  # see make_q3_quants on the early stop
        for i in range(xt.shape[0]):
            wi, xi, li = wt[i], xt[i], L[i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, _nearest_int(xi * sl2 / slx))
            nf = new.astype(F32)
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take = ok & (new != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new & 0xFF, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L).T


def _imatrix_weights(rows, imatrix, group: int, sigma_factor: int, sigma_n: int) -> np.ndarray:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` with ``sigma2 = factor*sum(x**2 over group)/n``."""
    r, n = rows.shape
    groups = rows.reshape(r, n // group, group)
    sigma2 = F32(sigma_factor) * _seq_sq(groups) / F32(sigma_n)
    weights = imatrix.reshape(1, n // group, group) * np.sqrt(sigma2[..., None] + groups * groups)
    return weights.reshape(r, n)


def _pack_nibbles(L: np.ndarray, half: int) -> np.ndarray:
    """4-bit codes -> bytes: in each run of 2*half codes, byte j = code j | code half+j << 4."""
    pairs = L.astype(np.uint8).reshape(L.shape[0], -1, 2, half)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _pack_crumbs(L: np.ndarray) -> np.ndarray:
    """2-bit codes ``(B, 256)`` -> 64 bytes: byte 32*h + l holds codes 128h + l + 32*{0,1,2,3}."""
    q = L.astype(np.uint8).reshape(L.shape[0], 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _bit_planes(high: np.ndarray) -> np.ndarray:
    """Bools ``(B, 256)`` -> 32 bytes: bit b of byte m is element 32*b + m."""
    planes = high.reshape(high.shape[0], 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(planes << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _bits5(L: np.ndarray) -> np.ndarray:
    """5-bit codes ``(B, 32)`` -> qh (4 bytes, bit j = bit 4 of code j) + 16 nibble bytes."""
    qh = np.packbits(((L >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([qh, _pack_nibbles(L & 0xF, 16)], axis=1)


# ---------------------------------------------------------------------------------------------
# Plain floats
# ---------------------------------------------------------------------------------------------


class F32Encoder(BlockEncoder, qtype=QT.F32):
    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        return blocks.astype("<f4").view(np.uint8).reshape(-1, 4)


class F16Encoder(BlockEncoder, qtype=QT.F16):
    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        return _fp16(blocks.reshape(-1))


class BF16Encoder(BlockEncoder, qtype=QT.BF16):
    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        # ggml_compute_fp32_to_bf16: NaN forced quiet, otherwise round to nearest even
        u = blocks.astype(F32).reshape(-1).view(np.uint32).astype(np.uint64)
        rne = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = np.where(nan, (u >> 16) | 64, rne).astype("<u2")
        return bits.view(np.uint8).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Legacy 32-element blocks
# ---------------------------------------------------------------------------------------------


class _LegacyWeights(BlockEncoder):
    @classmethod
    def search_weights(cls, rows, imatrix):
        # quantize_row_q4_0_impl & co.: sigma2 is the mean square of the whole row
        return _imatrix_weights(rows, imatrix, rows.shape[1], 1, rows.shape[1])


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))


class Q8_0(BlockEncoder, qtype=QT.Q8_0):
    """``d: f16 | qs: int8[32]`` — x ≈ d * q."""

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        d = np.abs(blocks).max(axis=1) / F32(127)
        v = blocks * _inverse(d)[:, None]
        a = np.abs(v)  # roundf: half away from zero
        q = np.copysign(np.floor(a) + (a - np.floor(a) >= F32(0.5)), v)
        return np.concatenate([_fp16(d), q.astype(np.int8).view(np.uint8)], axis=1)


class Q4_0(_LegacyWeights, qtype=QT.Q4_0):
    """``d: f16 | qs: u8[16]`` — byte j holds codes j (low) and j+16 (high); x ≈ d*(q-8)."""

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        if weights is not None:
            d, L = make_qx_quants(blocks, 8, weights)
        else:
            d = _absmax(blocks) / F32(-8)
            v = blocks * _inverse(d)[:, None] + F32(8.5)
            L = np.minimum(15, v.astype(np.int32))
        return np.concatenate([_fp16(d), _pack_nibbles(L, 16)], axis=1)


class Q4_1(_LegacyWeights, qtype=QT.Q4_1):
    """``d: f16 | m: f16 | qs: u8[16]`` — x ≈ d*q + m."""

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        if weights is not None:
            d, the_min, L = make_qkx_quants(blocks, weights, 15, -0.9, 0.05, 36, False)
            m = -the_min
        else:
            m, d, L = _min_max_codes(blocks, 15)
            L = np.minimum(15, L)
        return np.concatenate([_fp16(d), _fp16(m), _pack_nibbles(L, 16)], axis=1)


def _min_max_codes(blocks: np.ndarray, nmax: int):
    # the first minimum / maximum, as the C's strict comparisons keep them (sign of zero)
    lo, hi = _pick(blocks, np.argmin(blocks, axis=1)), _pick(blocks, np.argmax(blocks, axis=1))
    d = (hi - lo) / F32(nmax)
    v = (blocks - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)
    return lo, d, v.astype(np.int32) & 0xFF  # (uint8_t) in the C


class Q5_0(_LegacyWeights, qtype=QT.Q5_0):
    """``d: f16 | qh: u32 (bit j = bit 4 of code j) | qs: u8[16]`` — x ≈ d*(q-16)."""

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        if weights is not None:
            d, L = make_qx_quants(blocks, 16, weights)
        else:
            d = _absmax(blocks) / F32(-16)
            v = blocks * _inverse(d)[:, None] + F32(16.5)
            L = np.minimum(31, v.astype(np.int32))
        return np.concatenate([_fp16(d), _bits5(L)], axis=1)


class Q5_1(_LegacyWeights, qtype=QT.Q5_1):
    """``d: f16 | m: f16 | qh: u32 | qs: u8[16]`` — x ≈ d*q + m."""

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        if weights is not None:
            d, the_min, L = make_qkx_quants(blocks, weights, 31, -0.9, 0.05, 36, False)
            m = -the_min
        else:
            m, d, L = _min_max_codes(blocks, 31)
        return np.concatenate([_fp16(d), _fp16(m), _bits5(L)], axis=1)


# ---------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks
# ---------------------------------------------------------------------------------------------


def _super_max(v: np.ndarray) -> np.ndarray:
    """``float m = 0; if (v[j] > m) m = v[j];`` per super-block."""
    top = np.where(np.isnan(v), -np.inf, v).max(axis=1)
    return np.where(top > 0, top, F32(0))  # +0 when nothing is positive; NaN never wins


@_quiet
def _requant(x, d, dm, L, nmin, nmax):
    """Re-derive codes from the stored (fp16-rounded) scales: ``nearest_int((x + dm)/d)``.

    ``dm`` None means ``x/d``. Sub-blocks whose scale reads back as 0 keep the codes of the
    search (the C's ``if (!d) continue;``).
    """
    num = x if dm is None else x + dm[..., None]
    q = np.clip(_nearest_int(num / d[..., None]), nmin, nmax)
    return np.where((d != 0)[..., None], q, L)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs -> 12 bytes (ggml's get_scale_min_k4 layout).

    ::

        byte  0..3 : ls[0..3] (bits 0-5) | ls[4..7] >> 4 (bits 6-7)
        byte  4..7 : lm[0..3] (bits 0-5) | lm[4..7] >> 4 (bits 6-7)
        byte 8..11 : ls[4..7] & 0xF      | (lm[4..7] & 0xF) << 4
    """
    ls, lm = ls & 0xFF, lm & 0xFF  # uint8_t in the C, values not clamped there
    out = np.empty((ls.shape[0], 12), dtype=np.int64)
    out[:, 0:4] = ls[:, :4] | (((ls[:, 4:] >> 4) << 6) & 0xFF)
    out[:, 4:8] = lm[:, :4] | (((lm[:, 4:] >> 4) << 6) & 0xFF)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (out & 0xFF).astype(np.uint8)


def _unpack_k4_scales(s: np.ndarray):
    """get_scale_min_k4 for j = 0..7 -> (sc, m), each ``(B, 8)`` int."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales -> 12 bytes.

    ::

        byte 0..7  : l[0..7] & 0xF | (l[8..15] & 0xF) << 4
        byte 8..11 : bits 2g..2g+1 of byte 8+k hold l[4g + k] >> 4, g = 0..3
    """
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4) << (2 * np.arange(4))[None, :, None]
    return np.concatenate([low, np.bitwise_or.reduce(hi, axis=1)], axis=1).astype(np.uint8)


class Q2_K(BlockEncoder, qtype=QT.Q2_K):
    """``scales: u8[16] (scale | min << 4) | qs: u8[64] (2-bit) | d: f16 | dmin: f16``.

    Sixteen sub-blocks of 16; x ≈ d*sc*q - dmin*m.
    """

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        if weights is None:
            sc, mn, L = make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
            sc, mn = sc.reshape(n, 16), mn.reshape(n, 16)
            max_sc, max_mn = _super_max(sc), _super_max(mn)
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = _nearest_int((F32(15) / max_sc)[:, None] * sc)
                lm = _nearest_int((F32(15) / max_mn)[:, None] * mn)
            ls = np.where((max_sc > 0)[:, None], ls & 0xFF, 0)
            lm = np.where((max_mn > 0)[:, None], lm, 0)
            packed = (ls | (lm << 4)) & 0xFF
            d = np.where(max_sc > 0, max_sc / F32(15), F32(0))
            dmin = np.where(max_mn > 0, max_mn / F32(15), F32(0))
        else:
            w = weights.reshape(n * 16, 16)
            sc, mn, L = make_qkx_quants(x, w, 3, -0.9, 0.05, 36, False)
            sw = _seq(w).reshape(n, 16)
            d, ls = make_qp_quants(sc.reshape(n, 16), 15, sw)
            dmin, lm = make_qp_quants(mn.reshape(n, 16), 15, sw)
            packed = (ls | (lm << 4)) & 0xFF
        ds, dms = _fp16_round(d), _fp16_round(dmin)
        dl = ds[:, None] * (packed & 0xF).astype(F32)
        ml = dms[:, None] * (packed >> 4).astype(F32)
        L = _requant(x.reshape(n, 16, 16), dl, ml, L.reshape(n, 16, 16), 0, 3)
        parts = [packed.astype(np.uint8), _pack_crumbs(L.reshape(n, 256)), _fp16(d), _fp16(dmin)]
        return np.concatenate(parts, axis=1)

    @classmethod
    def search_weights(cls, rows, imatrix):
        return _imatrix_weights(rows, imatrix, QK_K, 1, QK_K)


class Q3_K(BlockEncoder, qtype=QT.Q3_K):
    """``hmask: u8[32] | qs: u8[64] (low 2 bits) | scales: 12 B (6-bit) | d: f16``.

    Sixteen sub-blocks of 16; code q in 0..7 (bit 2 in hmask), x ≈ d*(sc-32)*(q-4).
    """

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        if weights is None:
            sc, L = make_q3_quants(x, 4)
            sc = sc.reshape(n, 16)
            max_sc = _absmax(sc)
            iscale = F32(-32) / np.where(max_sc != 0, max_sc, F32(1))
            l6 = np.clip(_nearest_int(iscale[:, None] * sc), -32, 31) + 32
            l6 = np.where((max_sc != 0)[:, None], l6, 0)
            d = np.where(max_sc != 0, F32(1) / iscale, F32(0))
        else:
            w = weights.reshape(n * 16, 16)
            sc, L = make_qx_quants(x, 4, w)
            d, l6 = make_qx_quants(sc.reshape(n, 16), 32, _seq(w).reshape(n, 16))
        dl = _fp16_round(d)[:, None] * (l6 - 32).astype(F32)
        L = _requant(x.reshape(n, 16, 16), dl, None, L.reshape(n, 16, 16), -4, 3)
        L = np.where((dl != 0)[..., None], L + 4, L).reshape(n, 256)
        hmask = _bit_planes(L > 3)
        qs = _pack_crumbs(np.where(L > 3, L - 4, L))
        return np.concatenate([hmask, qs, _pack_q3_scales(l6), _fp16(d)], axis=1)

    @classmethod
    def search_weights(cls, rows, imatrix):
        return _imatrix_weights(rows, imatrix, QK_K, 2, QK_K)


def _k4_search(blocks, weights, nmax, ref_args):
    """Shared scale/min search of Q4_K and Q5_K -> (packed scales, d, dmin, codes)."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32)
    if weights is None:
        av_x = np.sqrt(_seq_sq(x) / F32(32))
        sc, mn, L = make_qkx_quants(x, av_x[:, None] + np.abs(x), nmax, *ref_args, False)
        sc, mn = sc.reshape(n, 8), mn.reshape(n, 8)
        max_sc, max_mn = _super_max(sc), _super_max(mn)
        with np.errstate(divide="ignore"):
            inv_sc = np.where(max_sc > 0, F32(63) / max_sc, F32(0))
            inv_mn = np.where(max_mn > 0, F32(63) / max_mn, F32(0))
        ls = np.minimum(63, _nearest_int(inv_sc[:, None] * sc) & 0xFF)
        lm = np.minimum(63, _nearest_int(inv_mn[:, None] * mn) & 0xFF)
        d, dmin = max_sc / F32(63), max_mn / F32(63)
    else:
        w = weights.reshape(n * 8, 32)
        sc, mn, L = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False)
        sw = _seq(w).reshape(n, 8)
        d, ls = make_qp_quants(sc.reshape(n, 8), 63, sw)
        dmin, lm = make_qp_quants(mn.reshape(n, 8), 63, sw)
        if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    packed = _pack_k4_scales(ls, lm)
    s, m = _unpack_k4_scales(packed)
    dl = _fp16_round(d)[:, None] * s.astype(F32)
    ml = _fp16_round(dmin)[:, None] * m.astype(F32)
    L = _requant(x.reshape(n, 8, 32), dl, ml, L.reshape(n, 8, 32), 0, nmax)
    return packed, d, dmin, L.reshape(n, 256)


class Q4_K(BlockEncoder, qtype=QT.Q4_K):
    """``d: f16 | dmin: f16 | scales: 12 B (8 x 6-bit scale, min) | qs: u8[128]``.

    Eight sub-blocks of 32; byte 32*c + l of qs holds codes 64c + l (low) and 64c + 32 + l
    (high); x ≈ d*sc*q - dmin*m.
    """

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        packed, d, dmin, L = _k4_search(blocks, weights, 15, (-1.0, 0.1, 20))
        return np.concatenate([_fp16(d), _fp16(dmin), packed, _pack_nibbles(L, 32)], axis=1)

    @classmethod
    def search_weights(cls, rows, imatrix):
        return _imatrix_weights(rows, imatrix, QK_K, 2, QK_K)


class Q5_K(BlockEncoder, qtype=QT.Q5_K):
    """``d | dmin | scales: 12 B | qh: u8[32] | qs: u8[128]`` — Q4_K plus a fifth bit.

    Bit c of qh[l] is bit 4 of code 32*c + l (so qh is bit-plane packed like Q3_K's hmask).
    """

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        packed, d, dmin, L = _k4_search(blocks, weights, 31, (-0.5, 0.1, 15))
        parts = [_fp16(d), _fp16(dmin), packed, _bit_planes(L > 15), _pack_nibbles(L & 0xF, 32)]
        return np.concatenate(parts, axis=1)

    @classmethod
    def search_weights(cls, rows, imatrix):
        return _imatrix_weights(rows, imatrix, QK_K, 2, QK_K)


class Q6_K(BlockEncoder, qtype=QT.Q6_K):
    """``ql: u8[128] | qh: u8[64] | scales: int8[16] | d: f16`` — x ≈ d*sc*(q-32).

    Per 128-element half h: ql[64h + l] = q(l) | q(l+64) << 4, ql[64h + 32 + l] = q(l+32) |
    q(l+96) << 4 (low nibbles), qh[32h + l] = the top 2 bits of q(l + 32k) at bits 2k.
    """

    @classmethod
    @_quiet
    def quantize_blocks(cls, blocks, weights=None):
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        w = None if weights is None else weights.reshape(n * 16, 16)
        sc, L = make_qx_quants(x, 32, w)  # the imatrix path passes quant_weights unchanged
        sc = sc.reshape(n, 16)
        max_sc = _absmax(sc)
        zero = np.abs(max_sc) < _EPS
        iscale = F32(-128) / np.where(zero, F32(1), max_sc)
        d = np.where(zero, F32(0), F32(1) / iscale)
        scales = np.minimum(127, _nearest_int(iscale[:, None] * sc))
        scales = np.where(zero[:, None], 0, scales)
        dl = _fp16_round(d)[:, None] * scales.astype(F32)
        L = _requant(x.reshape(n, 16, 16), dl, None, L.reshape(n, 16, 16), -32, 31)
        L = np.where((dl != 0)[..., None], L + 32, L).reshape(n, 2, 4, 32)
        L = np.where(zero[:, None, None, None], 0, L).astype(np.uint8)
        lo = L & 0xF
        ql = [lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4]
        ql = np.concatenate(ql, axis=2)
        hi = L >> 4
        qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), scales.astype(np.int8).view(np.uint8)]
        return np.concatenate([*parts, _fp16(d)], axis=1)

    @classmethod
    def search_weights(cls, rows, imatrix):
        return np.broadcast_to(imatrix, rows.shape).astype(F32)


_MISSING = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K}
_MISSING |= {QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
_MISSING -= _REGISTRY.keys()
if _MISSING:  # pragma: no cover - a class deleted above; fail at import, not at first use
    raise TypeError(f"no encoder registered for {sorted(t.name for t in _MISSING)}")
