"""Round-to-nearest: every weight to its nearest code, parameters from the group's range.

The baseline every other method must beat, and the only one that needs no data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..formats import QuantizedTensor, QuantScheme, quantize_tensor
from .registry import Quantizer, register


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest takes no options."""


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                    config: Any = None) -> QuantizedTensor:
    return quantize_tensor(w, scheme)


register(Quantizer("rtn", quantize_weight, RTNConfig,
                   description="round to nearest, no calibration"))
