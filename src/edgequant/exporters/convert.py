"""A transformers causal LM as GGUF tensors and metadata, the way llama.cpp's converter does.

:func:`convert` reads the model through its :class:`~edgequant.models.architectures.ArchSpec`
(never a hard-coded module name) and returns a :class:`Conversion`: the float32 tensors under
their GGUF names (loaded lazily, one at a time) and every metadata key. Encoding and writing
live in :mod:`edgequant.exporters.gguf`.

What llama.cpp expects, and what is done here (``convert_hf_to_gguf.py`` of llama-cpp-python
0.3.36 is the reference):

================= ==========================================================================
llama / mistral   q/k rows reordered from HF's rotate-half layout to llama.cpp's interleaved
                  pairs (``LlamaModel.permute``; biases too); ``llama.rope.dimension_count``
                  and ``llama.vocab_size``; Llama-3 RoPE scaling as a ``rope_freqs`` tensor
qwen2             no permutation (NEOX RoPE); q/k/v biases
gemma3            every norm stored as ``weight + 1`` (Gemma's RMSNorm scales by 1 + w);
                  the embedding is stored unscaled — llama.cpp multiplies it by
                  ``sqrt(n_embd)`` itself; sliding window, its per-layer pattern (a bool array
                  from ``layer_types``), the sliding layers' RoPE base; llama.cpp fixes the
                  attention scale to ``1/sqrt(head_dim)``, so another
                  ``query_pre_attn_scalar`` is refused rather than silently changed
all               tied ``lm_head``: no ``output.weight``; norms and biases float32
================= ==========================================================================

Quantized (edgequant) models convert too: every ``QuantLinear`` contributes its dequantized
weight. Exporting such a model re-quantizes those weights into GGML blocks — exact only where
the two grids coincide, and a W8A8 layer loses its activation quantization.

Example:
    >>> conv = convert(eq.load("smollm2-135m"))
    >>> conv.arch, len(conv.tensors), conv.tensors[0].name
    ('llama', 272, 'token_embd.weight')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGUFValueType, Keys
from torch import nn

from ..errors import GGUFError
from ..gguf.tokenizer import TokenizerKV, tokenizer_kv
from ..models.architectures import (
    ArchSpec,
    block_list,
    gguf_arch_for,
    is_tied,
    rope_permute_qk,
    spec_for,
)
from ..nn.quant_linear import QuantLinear

__all__ = ["Conversion", "KV", "SourceTensor", "convert", "hparams_kv", "permute_rows"]

KV = tuple[str, Any, GGUFValueType, "GGUFValueType | None"]
_U32, _F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor before encoding.

    Attributes:
        name: GGUF name (``blk.3.attn_q.weight``).
        shape: numpy order: ``(rows, row_length)`` for a matrix, ``(n,)`` for a vector.
        load: returns the float32 data (computed on demand, so only one tensor at a time
            needs a float32 copy).
        source: where it came from in the HF model (for messages).
    """

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False, compare=False)
    source: str = ""


@dataclass
class Conversion:
    """A model as GGUF: architecture, tensors in file order, and metadata.

    ``kv`` holds the model keys (hyper-parameters, ``general.*``) and ``tokenizer`` the
    tokenizer keys; ``general.file_type`` is the exporter's to add.
    """

    arch: str
    tensors: list[SourceTensor]
    kv: list[KV]
    tokenizer: TokenizerKV
    n_layer: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)

    def all_kv(self) -> list[KV]:
        return [*self.kv, *self.tokenizer.items()]


def convert(model: Any, tokenizer: Any = None, name: str | None = None,
            pre: str | None = None) -> Conversion:
    """Describe a causal LM as GGUF tensors and keys.

    Args:
        model: an edgequant ``Model`` or a transformers causal LM (then pass ``tokenizer``).
        tokenizer: its tokenizer (taken from a ``Model`` when not given).
        name: ``general.name`` (default: the model's name or config name).
        pre: force ``tokenizer.ggml.pre`` (see :func:`~edgequant.gguf.tokenizer.tokenizer_kv`).

    Raises:
        UnsupportedArchitectureError: no table entry for the model type.
        GGUFError: a configuration llama.cpp cannot reproduce (see the module docstring).
    """
    module = getattr(model, "module", model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise GGUFError("GGUF files carry their tokenizer: pass the model's tokenizer")
    if not isinstance(module, nn.Module) or not hasattr(module, "config"):
        raise GGUFError(f"cannot convert a {type(module).__name__}: expected a transformers "
                        "causal LM or an edgequant Model")
    config = module.config
    spec = spec_for(config)
    arch = gguf_arch_for(config)
    dims = spec.dims(config)
    name = name or getattr(model, "name", None) or getattr(config, "_name_or_path", "") or arch
    kv: list[KV] = [(Keys.General.TYPE, "model", GGUFValueType.STRING, None),
                    (Keys.General.NAME, str(name), GGUFValueType.STRING, None),
                    *hparams_kv(config, arch)]
    tensors = _tensors(module, spec, config, dims)
    return Conversion(arch, tensors, kv, tokenizer_kv(tokenizer, dims["vocab"], config, pre),
                      n_layer=len(block_list(module, spec)), n_head=dims["heads"],
                      n_head_kv=dims["kv_heads"])


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, HF's halves ``[x0..x(d/2-1) | y0..]``
    become interleaved pairs ``[x0 y0 x1 y1 …]`` (``LlamaModel.permute``)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


# --- tensors --------------------------------------------------------------------------------


def _tensors(module: nn.Module, spec: ArchSpec, config: Any, dims: dict[str, int]
             ) -> list[SourceTensor]:
    permute = rope_permute_qk(config)
    heads = {"q": dims["heads"], "k": dims["kv_heads"]}
    offset = spec.gguf_norm_offset
    out = [_param(module, spec.embed, "weight", spec.gguf_name("embed"))]
    for i, block in enumerate(block_list(module, spec)):
        prefix = f"{spec.blocks}.{i}."
        for role in spec.block_roles:
            mod = block.get_submodule(role.path)
            for suffix in ("weight", "bias"):
                if not _has(mod, suffix):
                    continue
                gname = spec.gguf_name(role.role, i, suffix)
                n_head = heads.get(role.role) if permute else None
                is_norm = role not in spec.linears
                out.append(_param(block, role.path, suffix, gname, prefix,
                                  add=offset if is_norm and suffix == "weight" else 0.0,
                                  n_head=n_head))
    out.append(_param(module, spec.final_norm, "weight", spec.gguf_name("final_norm"),
                      add=offset))
    head = module.get_submodule(spec.lm_head)
    if isinstance(head, QuantLinear) or not is_tied(module, spec):
        out.append(_param(module, spec.lm_head, "weight", spec.gguf_name("lm_head")))
    freqs = _llama3_rope_freqs(config, dims["head_dim"])
    if freqs is not None:
        out.insert(0, SourceTensor("rope_freqs.weight", freqs.shape, lambda: freqs, "rope"))
    return out


def _has(mod: nn.Module, suffix: str) -> bool:
    if isinstance(mod, QuantLinear):
        return suffix == "weight" or mod.bias is not None
    return isinstance(getattr(mod, suffix, None), torch.Tensor)


def _param(root: nn.Module, path: str, suffix: str, gname: str, prefix: str = "",
           add: float = 0.0, n_head: int | None = None) -> SourceTensor:
    mod = root.get_submodule(path)
    where = f"{prefix}{path}.{suffix}"
    if isinstance(mod, QuantLinear):
        shape: tuple[int, ...] = ((mod.out_features, mod.in_features) if suffix == "weight"
                                  else (mod.out_features,))
    else:
        t = getattr(mod, suffix, None)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise GGUFError(f"{where} is not a float tensor ({type(t).__name__}); cannot export it")
        shape = tuple(t.shape)

    def load() -> np.ndarray:
        if isinstance(mod, QuantLinear) and suffix == "weight":
            t = mod.dequantized_weight(torch.float32)
        else:
            t = getattr(mod, suffix)
        a = t.detach().to(torch.float32).cpu().numpy()
        if add:
            a = a + np.float32(add)
        if n_head is not None:
            a = permute_rows(a, n_head)
        return np.ascontiguousarray(a, dtype=np.float32)

    return SourceTensor(gname, shape, load, where)


# --- hyper-parameters -----------------------------------------------------------------------


def hparams_kv(config: Any, arch: str) -> list[KV]:
    """The ``{arch}.*`` keys of a HF config for llama.cpp's loader of ``arch``."""
    try:
        handler = _HPARAMS[arch]
    except KeyError:
        raise GGUFError(f"no GGUF hyper-parameter mapping for architecture {arch!r}") from None
    keys: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}
    handler(config, keys)
    return [(k.format(arch=arch), v, t, s) for k, (v, t, s) in keys.items()]


_Keys = dict[str, tuple[Any, GGUFValueType, "GGUFValueType | None"]]
LLM, ATT, ROPE = Keys.LLM, Keys.Attention, Keys.Rope


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def _rope(config: Any, kind: str = "full_attention") -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(kind, params) if isinstance(params.get(kind), dict) else params
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params = {**params, "rope_theta": config.rope_theta}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and "rope_type" not in params:
        params = {**params, **scaling}
    return params


def _common(config: Any, keys: _Keys) -> None:
    """``TextModel.set_gguf_parameters``: sizes, heads, RoPE base and scaling, norm epsilon."""
    keys[LLM.CONTEXT_LENGTH] = (int(config.max_position_embeddings), _U32, None)
    keys[LLM.EMBEDDING_LENGTH] = (int(config.hidden_size), _U32, None)
    keys[LLM.BLOCK_COUNT] = (int(config.num_hidden_layers), _U32, None)
    keys[LLM.FEED_FORWARD_LENGTH] = (int(config.intermediate_size), _U32, None)
    keys[ATT.HEAD_COUNT] = (int(config.num_attention_heads), _U32, None)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    keys[ATT.HEAD_COUNT_KV] = (int(kv_heads), _U32, None)
    rope = _rope(config)
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        keys[ROPE.SCALING_TYPE] = ("linear", GGUFValueType.STRING, None)
        keys[ROPE.SCALING_FACTOR] = (float(factor), _F32, None)
    elif rope_type == "yarn" and factor is not None:
        keys[ROPE.SCALING_TYPE] = ("yarn", GGUFValueType.STRING, None)
        keys[ROPE.SCALING_FACTOR] = (float(factor), _F32, None)
        keys[ROPE.SCALING_ORIG_CTX_LEN] = (int(rope["original_max_position_embeddings"]),
                                           _U32, None)
        for src, key in (("extrapolation_factor", ROPE.SCALING_YARN_EXT_FACTOR),
                         ("attention_factor", ROPE.SCALING_YARN_ATTN_FACTOR),
                         ("beta_fast", ROPE.SCALING_YARN_BETA_FAST),
                         ("beta_slow", ROPE.SCALING_YARN_BETA_SLOW)):
            if rope.get(src) is not None:
                keys[key] = (float(rope[src]), _F32, None)
    elif rope_type not in ("default", "llama3"):
        raise GGUFError(f"RoPE scaling {rope_type!r} is not supported by the GGUF converter "
                        "(supported: default, linear, yarn, llama3)")
    if rope.get("rope_theta") is not None:
        keys[ROPE.FREQ_BASE] = (float(rope["rope_theta"]), _F32, None)
    keys[ATT.LAYERNORM_RMS_EPS] = (float(config.rms_norm_eps), _F32, None)
    keys[ATT.KEY_LENGTH] = (_head_dim(config), _U32, None)
    keys[ATT.VALUE_LENGTH] = (_head_dim(config), _U32, None)


def _llama(config: Any, keys: _Keys) -> None:
    _common(config, keys)
    keys[LLM.VOCAB_SIZE] = (int(config.vocab_size), _U32, None)
    keys[ROPE.DIMENSION_COUNT] = (_head_dim(config), _U32, None)


def _qwen2(config: Any, keys: _Keys) -> None:
    if getattr(config, "use_sliding_window", False):
        raise GGUFError("Qwen2 with use_sliding_window=True has no llama.cpp equivalent")
    _common(config, keys)


def _gemma3(config: Any, keys: _Keys) -> None:
    """``Gemma3Model.set_gguf_parameters`` plus the per-layer window pattern."""
    _common(config, keys)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise GGUFError("Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 ignores it")
    n_layer, head_dim = config.num_hidden_layers, _head_dim(config)
    expected = (config.hidden_size / config.num_attention_heads if n_layer == 62 else head_dim)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and not math.isclose(float(scalar), float(expected)):
        raise GGUFError(f"query_pre_attn_scalar={scalar}, but llama.cpp's gemma3 scales "
                        f"attention by 1/sqrt({expected:g}) for a {n_layer}-layer model")
    if getattr(config, "final_logit_softcapping", None):
        keys[LLM.FINAL_LOGIT_SOFTCAPPING] = (float(config.final_logit_softcapping), _F32, None)
    types = list(getattr(config, "layer_types", None) or [])
    pattern = [t == "sliding_attention" for t in types]
    if any(pattern):
        keys[ATT.SLIDING_WINDOW] = (int(config.sliding_window), _U32, None)
        keys[ATT.SLIDING_WINDOW_PATTERN] = (pattern, GGUFValueType.ARRAY, GGUFValueType.BOOL)
        swa = _rope(config, "sliding_attention")
        if swa.get("rope_theta") is not None:
            keys[ROPE.FREQ_BASE_SWA] = (float(swa["rope_theta"]), _F32, None)


_HPARAMS: dict[str, Callable[[Any, _Keys], None]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gemma3": _gemma3,
}


def _llama3_rope_freqs(config: Any, head_dim: int) -> np.ndarray | None:
    """``LlamaModel.generate_extra_tensors``: per-frequency factors of Llama-3 RoPE scaling."""
    rope = _rope(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
