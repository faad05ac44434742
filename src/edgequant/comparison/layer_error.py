"""Per-layer relative weight error ``‖W − Ŵ‖_F / ‖W‖_F`` of our artifacts against their source.

``Ŵ`` is read back from the artifact, never taken from the quantizer's memory:

- a native artifact: each ``QuantLinear``'s dequantized weight (:func:`native_errors`);
- a GGUF file we exported: each 2-D block tensor dequantized by ``gguf`` and compared with
  the same tensor of the source in GGUF layout (:func:`gguf_errors`; the converter's q/k row
  permutation applies to both sides).

Methods with a transform (AWQ, SmoothQuant) fold exact per-channel scales into the weights
before rounding (``W' = diag(r)·W·diag(c)``, the inverse folded into the neighbouring norm or
layer), so ``Ŵ`` approximates ``W'``, not ``W``. For those, ``r`` and ``c`` are fitted by
alternating least squares before measuring (``rescaled=True``); the reported error is then
``‖W' − Ŵ‖ / ‖W'‖`` — the rounding error in the space the method quantized in. Other methods
are measured as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_BLOCK = re.compile(r"(?:^|\.)(\d+)\.")
_GGUF_ROLES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
               "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
               "ffn_down": "down_proj"}


def layer_key(name: str) -> tuple[int | None, str]:
    """``(block index, role)`` of a layer name (``model.layers.3.mlp.up_proj`` → (3, up_proj);
    ``blk.3.ffn_up.weight`` → (3, up_proj))."""
    m = _BLOCK.search(name)
    block = int(m.group(1)) if m else None
    base = name[:-len(".weight")] if name.endswith(".weight") else name
    role = base.rsplit(".", 1)[-1]
    return block, _GGUF_ROLES.get(role, role)


def fit_scales(w: np.ndarray, w_hat: np.ndarray, iters: int = 200, tol: float = 1e-12
               ) -> np.ndarray:
    """``diag(r)·w·diag(c)`` closest to ``w_hat`` (alternating least squares in float64,
    until the residual stops moving by ``tol`` relative)."""
    w = w.astype(np.float64)
    wh = w_hat.astype(np.float64)
    c = np.ones(w.shape[1])
    prev = np.inf
    for _ in range(iters):
        a = w * c                                   # (out, in)
        r = (wh * a).sum(1) / np.maximum((a * a).sum(1), 1e-30)
        b = w * r[:, None]
        c = (wh * b).sum(0) / np.maximum((b * b).sum(0), 1e-30)
        res = float(np.linalg.norm(b * c - wh))
        if prev - res <= tol * max(res, 1e-30) or res == 0.0:
            break
        prev = res
    return b * c


def relative_error(w: np.ndarray, w_hat: np.ndarray, rescaled: bool = False) -> float:
    """``‖w − ŵ‖_F / ‖w‖_F`` (``w`` rescaled to ``ŵ`` first when ``rescaled``)."""
    if w.shape != w_hat.shape:
        raise ValueError(f"shape {w.shape} vs {w_hat.shape}")
    ref = fit_scales(w, w_hat) if rescaled else w.astype(np.float64)
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - w_hat.astype(np.float64)) / den) if den else 0.0


def _record(name: str, w: np.ndarray, w_hat: np.ndarray, rescaled: bool) -> dict[str, Any]:
    block, role = layer_key(name)
    return {"layer": name, "block": block, "role": role,
            "rel_error": relative_error(w, w_hat, rescaled), "numel": int(w.size)}


def native_errors(source_module: Any, artifact: str | Path, rescaled: bool = False
                  ) -> list[dict[str, Any]]:
    """Errors of every ``QuantLinear`` of a native artifact against ``source_module``."""
    import torch

    from .. import load
    from ..nn.quant_linear import QuantLinear

    q = load(artifact)
    out = []
    with torch.no_grad():
        for name, mod in q.module.named_modules():
            if not isinstance(mod, QuantLinear):
                continue
            w = source_module.get_submodule(name).weight.detach().float().cpu().numpy()
            w_hat = mod.dequantized_weight(torch.float32).cpu().numpy()
            out.append(_record(name, w, w_hat, rescaled))
    return out


def gguf_errors(source_model: Any, path: str | Path, tokenizer_pre: str | None = None
                ) -> list[dict[str, Any]]:
    """Errors of the 2-D block tensors of a GGUF file against ``source_model`` converted the
    same way (names are the source's HF paths; ``tokenizer_pre`` as for the export)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from ..exporters.convert import convert

    ref = {t.name: t for t in convert(source_model, pre=tokenizer_pre).tensors
           if t.name.startswith("blk.") and len(t.shape) == 2}
    out = []
    for t in _tensors(GGUFReader(str(path))):
        src = ref.get(t.name)
        if src is None:
            continue
        w = src.load()
        w_hat = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(w.shape)
        name = src.source[:-len(".weight")] if src.source.endswith(".weight") else src.source
        out.append(_record(name or t.name, w, w_hat, False))
    return out


def _tensors(reader: Any) -> Iterable[Any]:
    return reader.tensors
