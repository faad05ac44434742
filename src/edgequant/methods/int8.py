"""The two int8 post-training flavours (no smoothing), both held by ``W8A8Linear``.

==========  ============================  =========================================  ===========
method      weights                       activations                                calibration
==========  ============================  =========================================  ===========
``dynamic`` int8 per output channel, RTN  int8 per token, range computed on the fly  none
``static``  int8 per output channel, RTN  int8 per tensor, range calibrated once     yes
==========  ============================  =========================================  ===========

The static range comes from an observer of the layer's calibration inputs (the pipeline's
``act_range`` statistic, observed with the earlier blocks already quantized): by default
min-max, the largest ``|x|`` any token showed, as PyTorch's static PTQ does; option
``observer`` picks ``percentile`` / ``histogram`` (clip at ``percentile``), ``entropy``
(TensorRT's KL choice), ``mse`` or ``moving-average`` (``observers.stats.ACT_OBSERVERS``).
Schemes: ``w8a8`` (dynamic) and ``w8a8-static``; any symmetric
per-channel integer weight width works (``w4a8``), as the codes fit int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme, quantize_tensor
from ..nn.w8a8 import check_w8a8_scheme
from ..observers.stats import act_observer
from .registry import Quantizer, register


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                    config: Any = None) -> QuantizedTensor:
    """Round-to-nearest weights for a W8A8 layer (the scheme must suit integer matmul)."""
    check_w8a8_scheme(scheme)
    return quantize_tensor(w, scheme)


def _dynamic_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                    config: Any = None) -> QuantizedTensor:
    if scheme.act_bits is not None and not scheme.act_dynamic:
        raise SchemeError(f"method dynamic computes activation ranges per token; scheme "
                          f"{scheme.name} asks for static ranges (use method static)")
    return quantize_weight(w, scheme, stats, config)


def _static_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                   config: Any = None) -> QuantizedTensor:
    if scheme.act_bits is not None and scheme.act_dynamic:
        raise SchemeError(f"method static calibrates activation ranges; scheme {scheme.name} "
                          f"is dynamic (use scheme w8a8-static, or method dynamic)")
    return quantize_weight(w, scheme, stats, config)


@dataclass(frozen=True)
class StaticConfig:
    """Which observer picks each layer's per-tensor activation range."""

    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        act_observer(self.observer, self.percentile)  # unknown name / bad percentile: refuse now


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic int8 takes no options: activation ranges are computed per token."""


register(Quantizer(
    "dynamic", _dynamic_weight, DynamicConfig, module="w8a8_linear", aliases=("int8-dynamic",),
    description="int8 weights per channel, int8 activations per token on the fly (w8a8)"))

register(Quantizer(
    "static", _static_weight, StaticConfig, needs=frozenset({"act_range"}),
    module="w8a8_linear", aliases=("int8-static",),
    description="int8 weights per channel, int8 activations per tensor with calibrated "
                "ranges (w8a8-static; observer=minmax|percentile|histogram|entropy|mse|…)"))
