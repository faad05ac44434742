"""llama.cpp's quantization mixtures: which GGML type each tensor of a model gets.

A llama.cpp file type such as ``Q4_K_M`` is not one tensor type but a mixture: most weights get
the file type's base type, while ``output.weight``, ``attn_v`` and ``ffn_down`` in chosen layers
get more bits. ``choose_types`` reproduces ``llama_tensor_get_type`` of ``src/llama-quant.cpp``
(llama.cpp as vendored by llama-cpp-python 0.3.36) as a pure function of tensor names and
shapes; the per-role rules are the tables below.

Things that matter and are easy to miss:

* The ``attn_v`` and ``ffn_down`` rules depend on counters advanced in the order llama.cpp walks
  the tensors: its loader sorts names by layer number, then by name (``weight_name_comparer``).
* With no ``output.weight`` the embeddings are tied, and ``token_embd.weight`` is typed like
  the output (Q6_K for most file types).
* Only 2-D-or-more tensors whose names end in ``weight`` are quantized; norms, 1-D tensors and a
  fixed list of small tensors keep their source type.
* A row length (GGML ``ne[0]``) that the chosen type's block does not divide falls back
  (q2_K/q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0), and to F16 if that block does
  not divide it either. The output tensor checks the base type's block first and takes Q8_0.

Example:
    >>> tensors = [TensorInfo("blk.0.attn_v.weight", (256, 2048))]
    >>> choose_types(tensors, "Q4_K_M", n_layer=1)["blk.0.attn_v.weight"].name
    'Q6_K'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgequant.errors import GGUFError

__all__ = [
    "FILE_TYPES",
    "TensorInfo",
    "bits_per_weight",
    "choose_types",
    "default_type",
    "tensor_allows_quantization",
]

QT = GGMLQuantizationType

#: llama.cpp file-type names -> ``enum llama_ftype`` values (``general.file_type`` in a GGUF).
FILE_TYPES: Mapping[str, int] = MappingProxyType(
    {
        "F32": 0,  # LLAMA_FTYPE_ALL_F32
        "F16": 1,
        "Q4_0": 2,
        "Q4_1": 3,
        "Q8_0": 7,
        "Q5_0": 8,
        "Q5_1": 9,
        "Q2_K": 10,
        "Q3_K_S": 11,
        "Q3_K_M": 12,
        "Q3_K_L": 13,
        "Q4_K_S": 14,
        "Q4_K_M": 15,
        "Q5_K_S": 16,
        "Q5_K_M": 17,
        "Q6_K": 18,
        "BF16": 32,
    }
)

# llama_ftype_get_default_type
_DEFAULT: Mapping[str, GGMLQuantizationType] = MappingProxyType(
    {
        "F32": QT.F32,
        "F16": QT.F16,
        "BF16": QT.BF16,
        "Q4_0": QT.Q4_0,
        "Q4_1": QT.Q4_1,
        "Q5_0": QT.Q5_0,
        "Q5_1": QT.Q5_1,
        "Q8_0": QT.Q8_0,
        "Q2_K": QT.Q2_K,
        "Q3_K_S": QT.Q3_K,
        "Q3_K_M": QT.Q3_K,
        "Q3_K_L": QT.Q3_K,
        "Q4_K_S": QT.Q4_K,
        "Q4_K_M": QT.Q4_K,
        "Q5_K_S": QT.Q5_K,
        "Q5_K_M": QT.Q5_K,
        "Q6_K": QT.Q6_K,
    }
)

_FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})

# tensor_type_fallback: a 256-block type whose block does not divide the row length
_FALLBACK: Mapping[GGMLQuantizationType, GGMLQuantizationType] = MappingProxyType(
    {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
)

# tensor_allows_quantization: name fragments that are never quantized (architecture-neutral)
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{p}.weight"
        for p in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2")
    ),
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

# llm_type == LLM_TYPE_70B, as the loaders set it from the block count
_70B_LAYERS: Mapping[str, int] = MappingProxyType(
    {"llama": 80, "deci": 80, "olmo": 80, "qwen2": 80, "jais2": 68}
)
# architectures with their own branches in llama-quant.cpp that are not modelled here
_UNMODELLED_ARCHS = frozenset({"glm5-next"})


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the mixture rules see it.

    Attributes:
        name: GGUF tensor name (``blk.3.ffn_down.weight``).
        shape: numpy order, outermost first: ``shape[-1]`` is the row length, GGML's ``ne[0]``.
        type: the source type, which tensors llama.cpp does not quantize keep.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType = field(default=QT.F32)

    @property
    def row_length(self) -> int:
        return int(self.shape[-1]) if self.shape else 1

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def n_dims(self) -> int:
        """``ggml_n_dims``: dimensions left after dropping outer sizes of 1."""
        dims = list(self.shape)
        while len(dims) > 1 and dims[0] == 1:
            dims.pop(0)
        return max(1, len(dims))


# --- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """What a rule may look at: the counter (or layer) of this tensor and the model's shape."""

    i: int  # i_attention_wv for attn_v, the layer for ffn_down
    n: int  # n_attention_wv, or n_layer
    falcon: bool
    n_gqa: int
    n_expert: int
    has_imatrix: bool

    @property
    def more_bits(self) -> bool:
        """``use_more_bits``: first and last eighth of the layers, and every third between."""
        i, n = self.i, self.n
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_Rule = Callable[[_Site], GGMLQuantizationType | None]  # None: keep the base type


def _keep(s: _Site) -> GGMLQuantizationType | None:
    return None


def _always(t: GGMLQuantizationType) -> _Rule:
    return lambda s: t


def _when(pred: Callable[[_Site], bool], t: GGMLQuantizationType) -> _Rule:
    return lambda s: t if pred(s) else None


def _moe8(s: _Site) -> bool:
    return s.n_expert == 8


# attn_v (and the fused attn_qkv / attn_kv_b): ftype -> rule
_ATTN_V: Mapping[str, _Rule] = MappingProxyType(
    {
        "Q2_K": lambda s: QT.Q4_K if s.n_gqa >= 4 else QT.Q3_K,
        "Q3_K_M": lambda s: QT.Q5_K if s.i < 2 else QT.Q4_K,
        "Q3_K_L": _always(QT.Q5_K),
        "Q4_K_M": _when(lambda s: s.more_bits, QT.Q6_K),
        "Q5_K_M": _when(lambda s: s.more_bits, QT.Q6_K),
        "Q4_K_S": _when(lambda s: s.i < 4, QT.Q5_K),
    }
)


def _q3km_down(s: _Site) -> GGMLQuantizationType:
    if s.i < s.n // 16:
        return QT.Q5_K
    return QT.Q4_K if not s.falcon or s.more_bits else QT.Q3_K


def _q4km_down(s: _Site) -> GGMLQuantizationType | None:
    if s.falcon:
        return QT.Q6_K if s.i < s.n // 16 else QT.Q5_K if s.more_bits else QT.Q4_K
    return QT.Q6_K if s.more_bits else None


# ffn_down: ftype -> rule (s.i is the layer, s.n the layer count)
_FFN_DOWN: Mapping[str, _Rule] = MappingProxyType(
    {
        "Q2_K": _always(QT.Q3_K),
        "Q3_K_M": _q3km_down,
        "Q3_K_L": lambda s: QT.Q4_K if s.falcon else QT.Q5_K,
        "Q4_K_M": _q4km_down,
        "Q5_K_M": _when(lambda s: s.more_bits, QT.Q6_K),
        "Q4_K_S": _when(lambda s: not s.falcon and s.i < s.n // 8, QT.Q5_K),
        # only with an imatrix, so that the no-imatrix result never changed
        "Q4_0": _when(lambda s: s.has_imatrix and s.i < s.n // 8, QT.Q4_1),
        "Q5_0": _when(lambda s: s.has_imatrix and s.i < s.n // 8, QT.Q5_1),
    }
)

# attn_output: ftype -> rule
_ATTN_OUTPUT: Mapping[str, _Rule] = MappingProxyType(
    {
        "Q2_K": lambda s: None if s.falcon else QT.Q5_K if _moe8(s) else QT.Q3_K,
        "Q3_K_S": _when(lambda s: not s.falcon and _moe8(s), QT.Q5_K),
        "Q3_K_M": lambda s: None if s.falcon else QT.Q5_K if _moe8(s) else QT.Q4_K,
        "Q3_K_L": lambda s: QT.Q4_K if s.falcon else None if _moe8(s) else QT.Q5_K,
        "Q4_K_S": _when(lambda s: not s.falcon and _moe8(s), QT.Q5_K),
        "Q4_K_M": _when(lambda s: not s.falcon and _moe8(s), QT.Q5_K),
    }
)


def _category(name: str) -> str:
    """``tensor_get_category``: the first matching role, by substring, in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for fragment, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if fragment in name:
            return cat
    return "other"


# --- public functions ---------------------------------------------------------------------------


def default_type(ftype: str) -> GGMLQuantizationType:
    """The base tensor type of a llama.cpp file type (``llama_ftype_get_default_type``)."""
    try:
        return _DEFAULT[ftype]
    except KeyError:
        raise GGUFError(
            f"unknown file type {ftype!r}; choose one of {', '.join(FILE_TYPES)}"
        ) from None


def tensor_allows_quantization(t: TensorInfo) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` (with the default quantize parameters)."""
    if t.n_dims < 2 or not t.name.endswith("weight"):
        return False
    if t.name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(fragment in t.name for fragment in _NEVER_QUANTIZED)


def choose_types(
    tensors: Iterable[TensorInfo],
    ftype: str,
    n_layer: int,
    n_expert: int = 0,
    arch: str = "llama",
    *,
    n_gqa: int = 1,
    has_imatrix: bool = False,
    is_70b: bool | None = None,
) -> dict[str, GGMLQuantizationType]:
    """The GGML type llama.cpp's ``llama_model_quantize`` gives each tensor.

    Args:
        tensors: every tensor of the model (the counters need all of them, in any order).
        ftype: a key of ``FILE_TYPES``, e.g. ``"Q4_K_M"``.
        n_layer: the model's block count (``n_ffn_down`` in llama.cpp).
        n_expert: experts per MoE layer (0 or 1 for a dense model).
        arch: the GGUF ``general.architecture``. Only falcon has its own rules for the file
            types here (and glm5-next, which is refused).
        n_gqa: attention heads per KV head (``n_head / n_head_kv``; Q2_K's attn_v uses it).
        has_imatrix: whether an importance matrix is used (changes Q4_0/Q5_0 ffn_down).
        is_70b: llama.cpp's LLM_TYPE_70B (attn_v gets Q5_K); by default derived from the
            layer count as llama.cpp's loaders do (80 layers of llama with GQA, deci, olmo,
            qwen2; 68 of jais2).

    Returns:
        ``{name: GGMLQuantizationType}`` for every tensor.
    """
    base = default_type(ftype)
    if arch in _UNMODELLED_ARCHS:
        raise GGUFError(f"llama.cpp has {arch}-specific mixture rules that edgequant lacks")
    items = sorted(tensors, key=_walk_order)
    if is_70b is None:
        is_70b = _70B_LAYERS.get(arch) == n_layer and (arch != "llama" or n_gqa > 1)
        is_70b &= not (arch == "llama" and n_expert == 8)
    tied = all(t.name != "output.weight" for t in items)
    n_attn_v = sum(_category(t.name) == "attn_v" for t in items)
    counters = {"attn_v": 0, "ffn_down": 0}

    def site(i: int, n: int) -> _Site:
        return _Site(i, n, arch == "falcon", n_gqa, n_expert, has_imatrix)

    out: dict[str, GGMLQuantizationType] = {}
    for t in items:
        if not tensor_allows_quantization(t):
            out[t.name] = t.type
            continue
        if base in _FLOAT_TYPES:
            out[t.name] = base
            continue
        cat = _category(t.name)
        new = base
        if cat == "output" or (tied and cat == "token_embd"):
            new = _output_type(t, base, arch)
        elif cat == "attn_v":
            new = _apply(_ATTN_V, ftype, site(counters["attn_v"], n_attn_v), base)
            if is_70b and new in (QT.Q3_K, QT.Q4_K):
                new = QT.Q5_K
            if n_expert == 8:
                new = QT.Q8_0
            counters["attn_v"] += 1
        elif cat == "attn_k" and n_expert == 8:
            new = QT.Q8_0
        elif cat == "ffn_down":
            layer = _layer_of(t.name, n_layer) if n_expert > 1 else counters["ffn_down"]
            new = _apply(_FFN_DOWN, ftype, site(layer, n_layer), base)
            counters["ffn_down"] += 1
        elif cat == "attn_output":
            new = _apply(_ATTN_OUTPUT, ftype, site(0, n_layer), base)
        out[t.name] = fallback(new, t.row_length)
    return out


def bits_per_weight(
    tensors: Iterable[TensorInfo], types: Mapping[str, GGMLQuantizationType]
) -> float:
    """Average stored bits per weight of a choice, counting block scales (all tensors)."""
    bits = count = 0
    for t in tensors:
        block, size = GGML_QUANT_SIZES[types[t.name]]
        rows = t.n_elements // max(1, t.row_length)
        bits += 8 * rows * (t.row_length // block) * size
        count += t.n_elements
    if count == 0:
        raise GGUFError("bits_per_weight needs at least one non-empty tensor")
    return bits / count


# --- helpers ------------------------------------------------------------------------------------

_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def _apply(
    table: Mapping[str, _Rule], ftype: str, s: _Site, base: GGMLQuantizationType
) -> GGMLQuantizationType:
    chosen = table.get(ftype, _keep)(s)
    return base if chosen is None else chosen


def _walk_order(t: TensorInfo) -> tuple[int, str]:
    """``weight_name_comparer``: layer number (-1 outside blocks), then the name."""
    m = _BLK.match(t.name)
    return (int(m.group(1)) if m else -1, t.name)


def _layer_of(name: str, n_layer: int) -> int:
    m = _BLK.match(name)
    if not m:
        raise GGUFError(f"cannot tell the layer of MoE tensor {name!r} (expected blk.N.)")
    layer = int(m.group(1))
    if not 0 <= layer < n_layer:
        raise GGUFError(f"layer {layer} of tensor {name!r} is outside [0, {n_layer})")
    return layer


def _output_type(t: TensorInfo, base: GGMLQuantizationType, arch: str) -> GGMLQuantizationType:
    """``output.weight`` (and tied ``token_embd.weight``): Q6_K unless Q8_0 was asked for."""
    if arch == "falcon" or t.row_length % GGML_QUANT_SIZES[base][0]:
        return QT.Q8_0
    return base if base == QT.Q8_0 else QT.Q6_K


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """``tensor_type_fallback``: a type whose block divides the row, or F16."""
    block = GGML_QUANT_SIZES[qtype][0]
    if row_length % block == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)  # 32-block types have no smaller block to go to
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else QT.F16
