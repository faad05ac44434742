"""optimum-quanto: qint2/4/8 and qfloat8 weights, and W8A8 (qint8 weights + qint8
activations with calibrated static scales).

``make`` runs ``optimum.quanto.quantize`` on every linear layer but ``lm_head``; for W8A8 it
then runs the calibration windows under ``optimum.quanto.Calibration`` to record activation
scales; ``freeze`` replaces the float weights by quantized tensors; quanto's own
``QuantizedModelForCausalLM.save_pretrained`` writes ``model.safetensors`` and
``quanto_qmap.json``. ``open`` is quanto's ``QuantizedModelForCausalLM.from_pretrained``: an
empty model (accelerate's ``init_empty_weights``) requantized from the stored tensors — no
fp32 source in memory.

Stored per layer: ``weight._data`` (int8 / float8 codes; qint4 and qint2 packed in uint8 as
``weight._data._data``), ``weight._scale`` (per row, or per group of 128 for qint4/qint2),
``weight._shift`` (qint4/qint2: per group) = data; ``input_scale`` and ``output_scale``
(scalars; meaningful for W8A8) = metadata.

quanto's packed qint4/qint2 tensors cannot run on inference tensors, so this Runnable computes
under ``torch.no_grad`` rather than ``torch.inference_mode`` (same numbers).

Note: quanto's ``Calibration`` context leaves the in-process model without its output
quantization hooks, so the W8A8 model as first quantized differs slightly from the saved one;
``open`` always runs the saved one (both the make process and a fresh process).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Source
from .runnable import PeerTorchRunnable, linear_layers, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

DATA = ("weight._data", "weight._data._data", "weight._scale", "weight._shift")


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    import optimum.quanto as oq
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    weights = getattr(oq, opts["weights"])
    acts = getattr(oq, opts["activations"]) if opts["activations"] else None
    oq.quantize(model, weights=weights, activations=acts, exclude=["lm_head"])
    if acts is not None:
        assert tokens is not None
        with torch.no_grad(), oq.Calibration(momentum=0.9):
            for row in tokens:
                model(input_ids=row[None], use_cache=False)
    oq.freeze(model)
    oq.QuantizedModelForCausalLM(model).save_pretrained(str(out))
    return {"config": {"weights": opts["weights"], "activations": opts["activations"],
                       "exclude": ["lm_head"], "calibration_momentum": 0.9 if acts else None},
            "reload": "native", "runtime": "optimum-quanto QLinear (CPU); lm_head, "
            "embeddings and norms fp32"}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import optimum.quanto as oq

    module = oq.QuantizedModelForCausalLM.from_pretrained(str(path))._wrapped
    return torch_runnable(path, record, module, linear_layers(module, (oq.QLinear,)), DATA,
                          no_grad=True, **options)
