"""bitsandbytes through transformers: NF4 / FP4 (with or without double quantization) and
LLM.int8, saved and reloaded in transformers' bitsandbytes serialization.

``make`` loads the source with a ``BitsAndBytesConfig`` (bitsandbytes quantizes each linear
layer of the transformer blocks while loading; ``lm_head`` stays dense, transformers' default)
and ``save_pretrained`` writes the packed weights and quant states. ``open`` reloads that
folder: the packed weights go straight into ``Linear4bit`` / ``Linear8bitLt``, no fp32 copy.

Stored per 4-bit layer: ``weight`` (uint8, two codes a byte), ``weight.absmax`` (fp32 per
block of 64, or uint8 with double quantization), ``weight.nested_absmax`` (fp32 per 256
absmax), and metadata: ``weight.quant_map`` (16 codebook values), ``weight.nested_quant_map``
(256 values), ``weight.quant_state.bitsandbytes__<type>`` (a JSON blob holding shape, dtype,
block sizes and the nested offset — that one fp32 per layer counts as weight data, as our own
nf4-dq format counts it). Per 8-bit layer: ``weight`` (int8) and ``weight.SCB``
(fp32 row absmax).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Source
from .runnable import PeerTorchRunnable, linear_layers, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

DATA_4BIT = ("weight", "weight.absmax", "weight.nested_absmax")
DATA_8BIT = ("weight", "weight.SCB", "SCB")


def _config(opts: dict[str, Any]) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if "threshold" in opts:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts["threshold"]))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts["quant_type"],
                              bnb_4bit_use_double_quant=bool(opts["double_quant"]),
                              bnb_4bit_compute_dtype=torch.float32)


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(opts)
    model = AutoModelForCausalLM.from_pretrained(str(src.folder), quantization_config=cfg,
                                                 dtype=torch.float32, device_map="cpu")
    model.save_pretrained(str(out))
    return {"config": cfg.to_dict(), "reload": "native",
            "runtime": "bitsandbytes CPU kernels; lm_head, embeddings and norms fp32"}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                  device_map="cpu")
    eight = "threshold" in record["options"]
    types = (bnb.nn.Linear8bitLt,) if eight else (bnb.nn.Linear4bit,)
    dq = bool(record["options"].get("double_quant"))
    return torch_runnable(path, record, module, linear_layers(module, types),
                          DATA_8BIT if eight else DATA_4BIT, inline_data_bytes=4 if dq else 0,
                          **options)


def dequantized_weights(runnable: PeerTorchRunnable) -> dict[str, torch.Tensor]:
    """fp32 weights of the 4-bit layers as bitsandbytes decodes them (for comparisons)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = {}
    for name, m in runnable.module.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w: Any = m.weight
            out[name] = F.dequantize_4bit(w.data, w.quant_state).float()
    return out
