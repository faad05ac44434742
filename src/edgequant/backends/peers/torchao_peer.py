"""torchao: what runs on CPU — int8 weight-only, int8 dynamic-activation + int8 weight, and
intx int4 weight-only (``Int4WeightOnlyConfig`` needs CUDA/XPU kernels and does not run here).

``make`` runs ``torchao.quantization.quantize_`` with the config on every linear layer but
``lm_head`` and saves with torchao's own safetensors support
(``torchao.prototype.safetensors.flatten_tensor_state_dict``: the tensor subclasses' data as
tensors, their attributes as JSON in the safetensors metadata — what transformers' TorchAo
integration writes). ``open`` builds the architecture without weights and assigns the
unflattened tensor subclasses — no fp32 source in memory.

Stored per layer: ``_weight_qdata`` (int8; the int4 config keeps one int4 code per int8 —
torchao's ``IntxUnpackedToInt8Tensor`` layout, so its real footprint is ~9.25 bits per
weight at group 32), ``_weight_scale`` (fp32 per row or group), ``_weight_zero_point``
(int4 config) = data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import Source, check_no_meta, empty_model
from .runnable import PeerTorchRunnable, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

WEIGHTS = "model.safetensors"
DATA = ("_weight_qdata", "_weight_scale", "_weight_zero_point")


def _config(opts: dict[str, Any]) -> Any:
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    kind = opts["config"]
    if kind == "int8wo":
        return Int8WeightOnlyConfig()
    if kind == "int8da":
        return Int8DynamicActivationInt8WeightConfig()
    if kind == "int4wo":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                    granularity=PerGroup(int(opts["group_size"])))
    raise ValueError(f"unknown torchao config {kind!r}")


def _is_block_linear(module: Any, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    import safetensors.torch
    import torch
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    cfg = _config(opts)
    quantize_(model, cfg, filter_fn=_is_block_linear)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict().items():  # tied tensors once
        if type(t) is torch.Tensor and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr()) if type(t) is torch.Tensor else None
        state[k] = t.detach() if type(t) is torch.Tensor else t
    tensors, metadata = flatten_tensor_state_dict(state)
    model.config.save_pretrained(str(out))
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                str(out / WEIGHTS), metadata=metadata)
    return {"config": {"type": type(cfg).__name__, "repr": repr(cfg)[:400],
                       "exclude": ["lm_head"]},
            "reload": "native", "runtime": "torchao tensor subclasses on CPU (aten int8 "
            "kernels / dequantize); lm_head, embeddings and norms fp32"}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import safetensors
    import safetensors.torch
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safetensors.safe_open(str(path / WEIGHTS), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(path / WEIGHTS))
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    model = empty_model(path)
    model.load_state_dict({**state, **leftover}, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    check_no_meta(model, path)
    qnames = json.loads(metadata["tensor_names"])
    layers = {}
    for name in qnames:
        meta = json.loads(metadata[name])
        if meta.get("_type") != "Tensor" and name.endswith(".weight"):
            layer = name[: -len(".weight")]
            mod: Any = model.get_submodule(layer)
            layers[layer] = int(mod.in_features) * int(mod.out_features)
    return torch_runnable(path, record, model, layers, DATA, **options)
