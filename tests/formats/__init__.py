"""Tests of ``edgequant.formats``; the helpers below are written from the documented rules."""

from __future__ import annotations

import torch

from edgequant.formats import QuantScheme

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def per_element(p: torch.Tensor, shape: tuple[int, int], scheme: QuantScheme) -> torch.Tensor:
    """Expand a (R', G, 1) parameter to the weight's shape: element (r, c) uses group c // g."""
    rows, cols = shape
    p = p.reshape(p.shape[0], p.shape[1])
    if scheme.granularity == "tensor":
        return p[0, 0].expand(rows, cols)
    if scheme.granularity == "channel":
        return p[:, :1].expand(rows, cols)
    return p[:, torch.arange(cols) // scheme.group_size]


def assert_rounded_up(s: torch.Tensor, exact: torch.Tensor, dtype_name: str) -> None:
    """``s`` is the smallest ``dtype_name`` value >= ``exact`` (1 where ``exact`` is 0).

    ``exact`` is in float64; the code computes in fp32 first, so two fp32 roundings are allowed.
    """
    s, exact = s.double(), exact.double()
    fp32 = 2.0**-22
    zero = exact == 0
    assert (s[zero] == 1).all()
    s, exact = s[~zero], exact[~zero]
    assert (s >= exact * (1 - fp32)).all(), "a scale was rounded down (the extreme value clips)"
    if dtype_name == "float32":
        assert (s <= exact * (1 + fp32)).all()
        return
    dt = DTYPES[dtype_name]
    assert torch.equal(s.to(dt).double(), s), "a scale is not representable in its dtype"
    below = torch.nextafter(s.to(dt), torch.zeros_like(s, dtype=dt)).double()
    assert (below < exact * (1 + fp32)).all(), "a smaller stored scale would have done"
