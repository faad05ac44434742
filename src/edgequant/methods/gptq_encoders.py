"""What GPTQ rounds to: the encoder interface of :func:`~edgequant.methods.gptq.gptq_solve`,
and the encoder of our native ``NumberFormat`` schemes.

GPTQ itself does not care about the number format. It needs to know how many columns share
quantization parameters (a *group*) and, each time columns are fixed, the values they were
rounded to, so that their error can be fed forward. Two kinds of encoder cover every format
we write:

* :class:`ColumnEncoder` rounds one column at a time, with parameters chosen when its group
  starts (from the error-updated weights) or up front — the paper's loop. Native schemes.
* :class:`GroupEncoder` rounds a whole group of columns at once, for formats whose encoder
  picks a block's scales and codes jointly (GGML blocks, :mod:`.gptq_ggml`). The group's
  error is fed forward in block form.

An encoder instance collects the codes of one call: make a new one for every weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from ..errors import SchemeError
from ..formats import NumberFormat, QuantizedTensor, QuantScheme, get_format
from ..formats.base import group

if TYPE_CHECKING:
    from .gptq import GPTQConfig

Params = dict[str, torch.Tensor]
ResultT = TypeVar("ResultT")

# the reference's ``mse`` search: shrink factors 1, 0.99, …, 0.21 of the range, norm 2.4
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


class Encoder(ABC, Generic[ResultT]):
    """The format side of GPTQ. Column indices ``j`` are in GPTQ's (possibly permuted) order."""

    def check(self, config: GPTQConfig) -> None:
        """Reject options this encoder cannot honour (SchemeError), before any work."""

    @abstractmethod
    def group_width(self, n_cols: int) -> int:
        """Columns sharing parameters (``n_cols`` for channel/tensor granularity)."""

    def lazy_block(self, block_size: int, n_cols: int) -> int:
        """Columns per lazy batch. By default a multiple of the group width, so every group
        sees the updates of all earlier columns when it starts."""
        g = self.group_width(n_cols)
        return g * max(1, block_size // g)

    @abstractmethod
    def begin(self, W: torch.Tensor, perm: torch.Tensor | None) -> None:
        """Start a call: ``W`` (R, C) float32 in original column order, dead inputs zeroed;
        ``perm`` the order in which GPTQ visits the columns (None: in order)."""

    @abstractmethod
    def finish(self) -> ResultT:
        """The encoded weight (in original column order), once every column is rounded."""


class ColumnEncoder(Encoder[ResultT]):
    """Rounds one column at a time; the solver calls :meth:`start_group` at each group start."""

    def start_group(self, Wg: torch.Tensor, j: int) -> None:
        """Column ``j`` starts a group; ``Wg`` (R, ≤ g) are its current (updated) weights."""

    @abstractmethod
    def round_column(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Round column ``j`` (current weights ``w``, (R,)); return the decoded values (R,)."""


class GroupEncoder(Encoder[ResultT]):
    """Rounds a whole group of columns at once (its lazy blocks must be whole groups)."""

    @abstractmethod
    def round_group(self, W: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        """Round columns ``j0:j1`` of ``W`` (R, C); return their decoded values (R, j1 − j0).

        Columns before ``j0`` hold the values they had when they were rounded; the others are
        up to date with every update that reached the current lazy block (all of them when
        :meth:`lazy_block` is the group width).
        """


# --------------------------------------------------------------------------- native schemes
class NativeEncoder(ColumnEncoder[QuantizedTensor]):
    """A native scheme (``int``, ``nf4``, ``fp8`` …) through the ``NumberFormat`` interface.

    Dynamic groups (group granularity without ``static_groups``) get their parameters when the
    group starts, from the error-updated weights; otherwise they are computed once from the
    original weights. With act-order and dynamic groups the result carries ``g_idx``.
    """

    def __init__(self, scheme: QuantScheme | str, mse_clip: bool = False,
                 static_groups: bool = False) -> None:
        self.scheme = QuantScheme.parse(scheme)
        self.mse_clip = mse_clip
        self.dynamic = self.scheme.granularity == "group" and not static_groups
        if self.scheme.double_quant and (self.dynamic or mse_clip):
            raise SchemeError("double-quantized scales are computed over the whole tensor: use "
                              "gptq with static_groups=True and mse_clip=False for this scheme")
        self.fmt: NumberFormat = get_format(self.scheme.format)

    def group_width(self, n_cols: int) -> int:
        return self.scheme.group_size or n_cols

    def lazy_block(self, block_size: int, n_cols: int) -> int:
        return super().lazy_block(block_size, n_cols) if self.dynamic else block_size

    def begin(self, W: torch.Tensor, perm: torch.Tensor | None) -> None:
        self.shape = (W.shape[0], W.shape[1])
        self.perm = perm
        self.codes = torch.empty(self.shape, dtype=torch.uint8, device=W.device)
        self.groups: list[Params] = []  # dynamic groups, in GPTQ order
        self.fixed = None if self.dynamic else self._params(group(W, self.scheme))

    def start_group(self, Wg: torch.Tensor, j: int) -> None:
        if self.dynamic:
            self.groups.append(self._params(Wg.unsqueeze(1)))

    def round_column(self, w: torch.Tensor, j: int) -> torch.Tensor:
        R = w.shape[0]
        p = self.groups[-1] if self.dynamic else \
            self._column_params(j if self.perm is None else int(self.perm[j]))
        c = self.fmt.encode(w.view(R, 1, 1), p, self.scheme)  # (R, 1, 1)
        self.codes[:, j] = c.view(R)
        return self.fmt.decode(c, p, self.scheme).view(R)

    def finish(self) -> QuantizedTensor:
        C, perm = self.shape[1], self.perm
        invperm = None if perm is None else torch.argsort(perm)
        codes = self.codes if invperm is None else self.codes[:, invperm]  # original order
        if self.dynamic:
            params = {k: torch.cat([p[k] for p in self.groups], dim=1) for k in self.groups[0]}
        else:
            assert self.fixed is not None
            params = self.fixed
        g_idx = None
        if self.dynamic and invperm is not None:
            # the group of original column perm[j] is j // group_size
            g_idx = (torch.arange(C, device=invperm.device) // self.group_width(C))[invperm]
        return QuantizedTensor.from_codes(codes.cpu(), {k: v.cpu() for k, v in params.items()},
                                          self.scheme, self.shape,
                                          None if g_idx is None else g_idx.cpu())

    def _params(self, xg: torch.Tensor) -> Params:
        if self.mse_clip:
            return search_params(self.fmt, xg, self.scheme)
        return self.fmt.params(xg, self.scheme)

    def _column_params(self, col: int) -> Params:
        """Parameters for original column ``col`` from the up-front (R', G, 1) parameters."""
        assert self.fixed is not None
        if self.scheme.granularity != "group":
            return self.fixed  # (R, 1, 1) or (1, 1, 1): broadcast over the column
        k = col // self.group_width(self.shape[1])
        return {name: v[:, k:k + 1] for name, v in self.fixed.items()}


def search_params(fmt: NumberFormat, xg: torch.Tensor, scheme: QuantScheme,
                  grid: int = MSE_GRID, max_shrink: float = MSE_MAX_SHRINK,
                  norm: float = MSE_NORM) -> Params:
    """Per group, the parameters of the shrunk range ``p·x`` (p = 1, 1 − 1/grid, …) that
    minimize ``Σ|x − x̂|^norm`` — the reference's ``mse`` option, for any format whose
    parameters scale with the data (range- and absmax-based ones).

    Args:
        xg: grouped view (R, G, g).
    Returns:
        parameters (R, G, 1) as ``fmt.params`` gives them.
    """
    best: Params = fmt.params(xg, scheme)
    best_err = _lp_error(fmt, xg, best, scheme, norm)
    for i in range(1, int(max_shrink * grid)):
        cand = fmt.params(xg * (1 - i / grid), scheme)
        err = _lp_error(fmt, xg, cand, scheme, norm)
        better = err < best_err
        best = {k: torch.where(better, cand[k], v) for k, v in best.items()}
        best_err = torch.where(better, err, best_err)
    return best


def _lp_error(fmt: NumberFormat, xg: torch.Tensor, params: Params, scheme: QuantScheme,
              norm: float) -> torch.Tensor:
    x_hat = fmt.decode(fmt.encode(xg, params, scheme), params, scheme)
    return (x_hat - xg).abs().pow(norm).sum(-1, keepdim=True)  # (R, G, 1)
