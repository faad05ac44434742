"""Importance matrices from the statistics engine, under llama.cpp's tensor names.

``llama-imatrix`` accumulates, over calibration tokens, Σ x_j² for every input column ``j``
of every linear inside the blocks (and the token count); ``llama-quantize --imatrix`` weights
each column's rounding error by Σ x_j² / count. :func:`collect` gets the same sums from
:func:`edgequant.statistics.collect_statistics` (statistic ``act_sumsq``) and names them as
the GGUF file does; the file formats are :class:`edgequant.gguf.imatrix.ImportanceMatrix`'s.
With ``hessians=True`` it also keeps each linear's Hessian for the GGUF GPTQ path (in memory
only; linears that read one input share one array, as in the engine).

Example:
    >>> im = collect(eq.load("smollm2-135m"), eq.data.calibration("wiki", n=64, seq_len=512))
    >>> im.save("smollm2.imatrix.gguf")
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.calibration import CalibrationSpec, resolve
from ..errors import GGUFError
from ..gguf.imatrix import ImportanceMatrix
from ..models.architectures import spec_for
from ..progress import Progress, no_progress
from ..statistics import collect_statistics

#: llama-imatrix computes in the model's precision: float32 forwards unless asked otherwise
DEFAULT_CALIBRATION = CalibrationSpec(n=64, seq_len=512, compute_dtype="float32")


def collect(model: Any, calib: Any = None, progress: Progress = no_progress,
            hessians: bool = False) -> ImportanceMatrix:
    """Σx² per input column of each block linear, keyed by GGUF tensor name.

    Args:
        model: an edgequant ``Model`` (its tokenizer resolves a calibration spec) or a
            transformers causal LM with token windows.
        calib: anything :func:`edgequant.data.calibration.resolve` takes; default ``wiki``,
            64 × 512 tokens, float32 forwards.
        progress: ``progress(items, total, what)`` wrapper for a progress bar.
        hessians: also keep ``Σ x xᵀ`` (as the engine's ``hessian``, ``2/n·Σ x xᵀ``) per
            linear for :mod:`edgequant.exporters.gguf`'s GPTQ path.

    Raises:
        GGUFError: the model overflows on the calibration data (non-finite sums).
    """
    module = getattr(model, "module", model)
    calibration = resolve(calib, getattr(model, "tokenizer", None), DEFAULT_CALIBRATION)
    needs = {"act_sumsq", "hessian"} if hessians else {"act_sumsq"}
    stats = collect_statistics(module, calibration, needs, progress)
    spec = spec_for(module)
    sums, counts, full = {}, {}, {}
    for path, s in stats.items():
        index, _, rel = path[len(spec.blocks) + 1:].partition(".")
        role = next(r.role for r in spec.linears if r.path == rel)
        name = spec.gguf_name(role, int(index))
        total = s["act_sumsq"].result()
        if not torch.isfinite(total).all():
            raise GGUFError(f"non-finite activations reached {name}; the model overflows on "
                            "the calibration data")
        sums[name] = total.to(torch.float32).numpy()
        counts[name] = int(s["act_sumsq"].n)
        if hessians:
            full[name] = s["hessian"].result().numpy()
    tokens = calibration.tokens
    dataset = str(calibration.description.get("corpus", "tokens"))
    return ImportanceMatrix(sums, counts, [dataset], int(tokens.shape[0]), int(tokens.shape[1]),
                            full if hessians else None)

