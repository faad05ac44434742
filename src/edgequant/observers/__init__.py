"""Statistics: observers turn the values a tensor takes into a quantization range.

| observer                       | range                                            |
| ------------------------------ | ------------------------------------------------ |
| ``MinMaxObserver``             | running min / max                                |
| ``MovingAverageMinMaxObserver``| exponential moving average of batch min / max    |
| ``HistogramObserver``          | percentile, or TensorRT entropy (KL) calibration |
| ``MSEObserver``                | shrunk range minimizing the quantization error   |
| ``PercentileObserver``         | exact (sampled) percentile of x or |x|           |

All share ``observe(x)`` / ``range() -> (lo, hi)``, per-tensor or per-channel along ``axis``.
"""

from .base import Observer, SampleStore, fake_quantize
from .histogram import HistogramObserver
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

__all__ = ["HistogramObserver", "MSEObserver", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "Observer", "PercentileObserver", "SampleStore", "fake_quantize"]
