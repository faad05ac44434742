"""LoRA on a quantized base: the base layer stays packed and frozen and runs through its kernel
(``QuantLinear``); a trainable low-rank update is added to its output:

    y = base(x) + (α/r) · B · A · dropout(x)        A: (r, in), B: (out, r), B starts at 0

so an untrained adapter changes nothing, bit for bit. Adapters are saved in peft's layout
(``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<layer>.lora_A.weight``) and load back onto the same base — or onto the
float model with peft itself.

Merging. Adding ``(α/r)·B·A`` to packed 4-bit codes would round most of a small update away
(peft's merged-NF4 complaint), so it is refused: :func:`merge_to_float` adds it to a float
copy of the dequantized base (exact), and re-quantizing that copy with any recipe
(``eq.quantize``) gives a native artifact again; :func:`codes_changed` reports the fraction of
codes that the merge moved.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..errors import EdgequantError
from ..io_utils import atomic_dir
from ..nn.quant_linear import QuantLinear
from ..nn.surgery import replace_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraError(EdgequantError):
    """A LoRA request that cannot be done (no matching layer, a layer type LoRA cannot wrap,
    a merge into packed codes)."""


@dataclass(frozen=True)
class LoraConfig:
    """Attributes:
        r: rank (per layer overrides in ``ranks``, e.g. PRILoRA's).
        alpha: the update is scaled by ``alpha / r``.
        dropout: on the adapter's input only.
        targets: layer name patterns (``fnmatch``), matched against the full name or its last
            part: ``q_proj`` matches every ``…self_attn.q_proj``.
        ranks: ``{layer name: rank}`` overriding ``r`` (peft's ``rank_pattern``).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1 or not 0 <= self.dropout < 1 or not self.targets:
            raise LoraError(f"LoRA needs r >= 1, 0 <= dropout < 1 and a target pattern; got "
                            f"r={self.r}, dropout={self.dropout}, targets={self.targets}")
        object.__setattr__(self, "targets", tuple(self.targets))

    def rank_of(self, name: str) -> int:
        return self.ranks.get(name, self.r)


class LoraLinear(nn.Module):
    """A frozen base layer (``QuantLinear`` or ``nn.Linear``) plus a LoRA update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features: int = int(base.in_features)  # type: ignore[arg-type]
        self.out_features: int = int(base.out_features)  # type: ignore[arg-type]
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft does
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        """``(α/r)·B·A``: the update to the weight, ``(out, in)`` float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def attach(module: nn.Module, config: LoraConfig) -> dict[str, LoraLinear]:
    """Wrap every layer matching ``config.targets`` in a ``LoraLinear``; freeze the rest.

    Raises:
        LoraError: no layer matches (the message lists the linear layers there are), or a
            matching module is not a linear layer LoRA can wrap.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    linear = (nn.Linear, QuantLinear)
    names = [n for n, m in module.named_modules() if n and _matches(n, config.targets)]
    if not names:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                       if isinstance(m, linear)})
        raise LoraError(f"no layer matches the LoRA targets {', '.join(config.targets)}; the "
                        f"model's linear layers are named: {', '.join(have)}")
    out: dict[str, LoraLinear] = {}
    for name in names:
        base = module.get_submodule(name)
        if isinstance(base, LoraLinear):
            raise LoraError(f"{name} already has a LoRA adapter")
        if not isinstance(base, linear):
            raise LoraError(f"{name} is a {type(base).__name__}, which LoRA cannot wrap (it "
                            f"takes nn.Linear and QuantLinear layers); narrow the targets")
        layer = LoraLinear(base, config.rank_of(name), config.alpha, config.dropout)
        replace_module(module, name, layer)
        out[name] = layer
    return out


def adapters(module: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLinear)}


# --- peft's format ----------------------------------------------------------------------------


def peft_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's names."""
    out = {}
    for name, m in adapters(module).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(module: nn.Module, path: str | Path, config: LoraConfig,
                 base_model: str = "", force: bool = False) -> Path:
    """Write the adapters as peft does: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    layers = adapters(module)
    if not layers:
        raise LoraError("the model has no LoRA adapter to save")
    names = sorted({n.rsplit(".", 1)[-1] for n in layers})
    ranks = {n: m.r for n, m in layers.items() if m.r != config.r}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
           "lora_alpha": config.alpha, "lora_dropout": config.dropout,
           "target_modules": names, "rank_pattern": ranks, "alpha_pattern": {},
           "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
           "modules_to_save": None, "base_model_name_or_path": base_model,
           "inference_mode": True, "use_dora": False, "use_rslora": False,
           "layers_to_transform": None, "layers_pattern": None, "revision": None}
    path = Path(path)
    with atomic_dir(path, force=force) as tmp:
        safetensors.torch.save_file(peft_state_dict(module), str(tmp / ADAPTER_WEIGHTS),
                                    metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def load_adapter(module: nn.Module, path: str | Path) -> dict[str, LoraLinear]:
    """Attach the peft-format adapter in ``path`` to ``module`` (its base, as saved).

    Raises:
        LoraError: not a LoRA adapter, or its weights do not fit the model.
    """
    path = Path(path)
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        weights = safetensors.torch.load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise LoraError(f"{path} is not a readable peft adapter folder ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LoraError(f"{path} holds a {cfg.get('peft_type')} adapter, not LORA")
    layers = sorted({k[len(PEFT_PREFIX):].rsplit(".", 2)[0] for k in weights
                     if k.startswith(PEFT_PREFIX)})
    ranks = {n: int(weights[f"{PEFT_PREFIX}{n}.lora_A.weight"].shape[0]) for n in layers}
    config = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=0.0,
                        targets=tuple(layers), ranks=ranks)
    try:
        attached = attach(module, config)
    except LoraError as e:
        raise LoraError(f"{path} does not fit this model: {e}") from None
    missing = set(attached) - set(layers)
    if missing:
        raise LoraError(f"{path} has no weights for {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, m in attached.items():
            for part in ("lora_A", "lora_B"):
                t = weights[f"{PEFT_PREFIX}{name}.{part}.weight"]
                dst = getattr(m, part).weight
                if t.shape != dst.shape:
                    raise LoraError(f"{path}: {name}.{part} has shape {tuple(t.shape)}, the "
                                    f"model needs {tuple(dst.shape)}")
                dst.copy_(t)
    return attached


# --- merging ----------------------------------------------------------------------------------


def refuse_merge_into_codes() -> None:
    """Merging into packed codes is never done silently (see the module docstring)."""
    raise LoraError("a LoRA update cannot be merged into packed quantized codes: rounding "
                    "would silently drop most of it. Merge into a float copy and re-quantize "
                    "(merge_to_float + eq.quantize, or `edgequant finetune … --merge RECIPE`)")


@torch.no_grad()
def merge_to_float(module: nn.Module) -> nn.Module:
    """A float copy of ``module`` with every adapter merged (``W + (α/r)·B·A`` on the base's
    dequantized weight) and every other ``QuantLinear`` dequantized: a plain float model."""
    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoraLinear):
            w = _float_weight(m.base) + m.delta()
            replace_module(out, name, _linear(w, getattr(m.base, "bias", None)))
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            replace_module(out, name, _linear(m.dequantized_weight(), m.bias))
    return out


def _float_weight(base: nn.Module) -> torch.Tensor:
    if isinstance(base, QuantLinear):
        return base.dequantized_weight(torch.float32)
    return base.weight.detach().float()  # type: ignore[union-attr,operator]


def _linear(w: torch.Tensor, bias: Any) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return lin


def codes_changed(before: nn.Module, after: nn.Module) -> dict[str, Any]:
    """Fraction of the quantized codes that differ between two models with the same layers
    and schemes (before and after merge + re-quantization)."""
    changed = total = 0
    per_layer = {}
    b_layers = {n: m for n, m in before.named_modules() if isinstance(m, QuantLinear)}
    for name, m in after.named_modules():
        base = b_layers.get(name.removesuffix(".base"))
        if not isinstance(m, QuantLinear) or base is None or base.scheme != m.scheme:
            continue
        c0, c1 = base.quantized().unpacked_codes(), m.quantized().unpacked_codes()
        n = int((c0 != c1).sum())
        per_layer[name] = n / c0.numel()
        changed += n
        total += c0.numel()
    return {"fraction": changed / total if total else float("nan"), "codes": total,
            "layers": per_layer}

