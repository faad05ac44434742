"""GPTQModel: GPTQ 4-bit (AutoGPTQ's successor), in its own GPTQ checkpoint format.

``make``: ``GPTQModel.load(<source folder>, QuantizeConfig(bits, group_size), device="cpu",
dtype=...)``, ``.quantize(<calibration windows>)``, ``.save(out)`` — ``qweight`` (int32,
eight 4-bit codes each), ``qzeros`` (int32, packed), ``scales`` (``dtype``) and ``g_idx``
(int32 group of each input column) per layer, plus ``quantize_config.json``. ``lm_head``
stays dense. ``open``: ``GPTQModel.load(<artifact>, device="cpu")``, which picks a CPU kernel
(``TorchAtenLinear`` here) and loads the packed tensors directly — no fp32 source in memory;
the non-quantized tensors compute in fp32.

gptqmodel sizes its CPU thread pool from ``GPTQMODEL_CPU_WORKERS`` when it is imported; the
adapter sets it to 2 when it is unset (:func:`before_import`), as ENVIRONMENT.md advises.
It is slow on CPU: minutes on a tiny model, ~40 min projected for SmolLM2 with 128 windows of
512 tokens; the record's ``make_s`` says what it took.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Source
from .runnable import PeerTorchRunnable, linear_layers, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

DATA = ("qweight", "qzeros", "scales", "g_idx")


def before_import() -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    assert tokens is not None
    cfg = QuantizeConfig(bits=int(opts["bits"]), group_size=int(opts["group_size"]))
    model = GPTQModel.load(str(src.folder), cfg, device="cpu",
                           dtype=getattr(torch, opts["dtype"]))
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in tokens]
    model.quantize(calib, batch_size=1)
    model.save(str(out))
    return {"config": {"bits": cfg.bits, "group_size": cfg.group_size,
                       "desc_act": getattr(cfg, "desc_act", None), "sym": getattr(cfg, "sym", None),
                       "dtype": opts["dtype"], "workers": os.environ.get("GPTQMODEL_CPU_WORKERS")},
            "reload": "native",
            "runtime": "gptqmodel CPU kernel (auto-selected); non-quantized tensors fp32"}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    wrapped = GPTQModel.load(str(path), device="cpu", dtype=torch.float32)
    module = wrapped.model
    return torch_runnable(path, record, module, linear_layers(module, (BaseQuantLinear,)), DATA,
                          **options)
