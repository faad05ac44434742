"""HQQ (half-quadratic quantization) through hqq's own API: ``HQQLinear``, 2–8 bits.

transformers' ``HqqConfig`` path does not run here, so ``make`` replaces every linear layer
of the transformer blocks with ``HQQLinear(linear, BaseQuantizeConfig(nbits, group_size))``
(hqq's ``AutoHQQHFModel.quantize_model``; ``lm_head`` stays dense, hqq's default) and saves
``HQQLinear.state_dict()`` — hqq's safetensors-compatible encoding, the layout transformers'
HQQ integration stores — with the dense tensors in one ``model.safetensors``. hqq's own
``save_quantized`` pickles (``qmodel.pt``); we do not.

Scale and zero are stored in ``meta_dtype`` (fp16 by default, HQQ's usual half-precision
metadata: 4 bits + 2×16/64 = 4.5 bits per weight at group 64); ``open`` builds the
architecture without weights, puts an ``HQQLinear`` (compute dtype fp32) in each quantized
place and loads the stored tensors into it — no fp32 source in memory.

Stored per layer: ``W_q`` (packed codes: 8/4/2-bit in uint8, 3-bit ten to an int32),
``scale``, ``zero`` (one per group) = data; the rest (``shape``, ``nbits``, ``packing`` …
as small tensors) = metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Source, check_no_meta, empty_model, save_dense_safetensors
from .runnable import PeerTorchRunnable, linear_layers, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

WEIGHTS = "model.safetensors"
DATA = ("W_q", "scale", "zero")


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    meta_dtype = getattr(torch, opts["meta_dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    cfg = BaseQuantizeConfig(nbits=int(opts["nbits"]), group_size=int(opts["group_size"]))
    # compute in fp32 (hqq casts every other layer to the compute dtype), then store scale
    # and zero in meta_dtype, as hqq does when it computes in that dtype
    AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float32,
                                  device="cpu")
    for m in model.modules():
        if isinstance(m, HQQLinear):
            m.encoded_state_dict = True
            for key in ("scale", "zero"):
                m.meta[key] = m.meta[key].to(meta_dtype)
    model.config.save_pretrained(str(out))
    save_dense_safetensors(model.state_dict(), out / WEIGHTS)
    return {"config": {"nbits": cfg["weight_quant_params"]["nbits"],
                       "group_size": cfg["weight_quant_params"]["group_size"],
                       "axis": cfg["weight_quant_params"]["axis"],
                       "optimize": cfg["weight_quant_params"]["optimize"],
                       "round_zero": cfg["weight_quant_params"]["round_zero"],
                       "meta_dtype": opts["meta_dtype"]},
            "reload": "native", "runtime": "HQQLinear, PyTorch backend: dequantize then fp32 "
            "matmul per call; lm_head, embeddings and norms fp32"}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import safetensors.torch
    import torch
    from hqq.core.quantize import HQQLinear

    model = empty_model(path)
    flat = safetensors.torch.load_file(str(path / WEIGHTS))
    qnames = sorted({k[: -len(".W_q")] for k in flat if k.endswith(".W_q")})
    for name in qnames:
        prefix = name + "."
        layer_state = {k[len(prefix):]: flat.pop(k) for k in list(flat) if k.startswith(prefix)}
        q = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
        q.load_state_dict(layer_state)
        model.set_submodule(name, q)
    model.load_state_dict(flat, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    check_no_meta(model, path)
    return torch_runnable(path, record, model, linear_layers(model, (HQQLinear,)), DATA,
                          **options)
