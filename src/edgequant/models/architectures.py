"""Per-architecture tensor roles: one small table that every generic driver reads.

The block-by-block pipeline, the GGUF converter and the grid-breaking permutation never
hard-code a module name. They ask :func:`spec_for` for the model's :class:`ArchSpec` and walk
its roles. Adding an architecture whose modules follow the Llama layout is one table entry.

Dimension tags
--------------
Every linear names the *kind* of its input and output dimension, so that code which transforms
a whole model (permutations, rotations, scale folding) can follow the residual stream without
knowing the architecture:

============== =========================================================================
tag            meaning (sizes from the HF config)
============== =========================================================================
``hidden``     the residual stream, ``hidden_size``
``inter``      the MLP intermediate dimension, ``intermediate_size``
``q_rope``     query heads, ``num_attention_heads * head_dim``; RoPE pairs features
``k_rope``     key heads, ``num_key_value_heads * head_dim``; RoPE pairs features
``kv_value``   value features of each KV head, ``num_key_value_heads * head_dim``
``q_value``    attention output, value features read per query head,
               ``num_attention_heads * head_dim`` (query head ``j`` reads KV head
               ``j // (num_attention_heads // num_key_value_heads)``)
``head_dim``   one head's features (``q_norm``/``k_norm`` act here)
``vocab``      the vocabulary
============== =========================================================================

Example:
    >>> spec = spec_for(model)
    >>> [r.role for r in spec.linears]
    ['q', 'k', 'v', 'o', 'gate', 'up', 'down']
    >>> spec.gguf_name("down", layer=3)
    'blk.3.ffn_down.weight'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

HIDDEN = "hidden"
INTER = "inter"
Q_ROPE = "q_rope"
K_ROPE = "k_rope"
KV_VALUE = "kv_value"
Q_VALUE = "q_value"
HEAD_DIM = "head_dim"
VOCAB = "vocab"


@dataclass(frozen=True)
class LinearRole:
    """One ``nn.Linear`` inside a block.

    ``path`` is relative to the block; ``gguf`` is the GGUF tensor stem with ``{i}`` for the
    block index (append ``.weight``/``.bias``). ``weight`` has shape ``(out_dim, in_dim)``.
    """

    role: str
    path: str
    gguf: str
    in_dim: str
    out_dim: str


@dataclass(frozen=True)
class NormRole:
    """One norm: a weight vector over ``dim`` (``hidden`` or ``head_dim``)."""

    role: str
    path: str
    gguf: str
    dim: str


@dataclass(frozen=True)
class ArchSpec:
    """Where the tensors of one architecture family live and what they mean.

    Paths are relative to the causal-LM model (``model.layers``, ``lm_head``) or, for
    ``linears`` and ``block_norms``, relative to one block. ``linears`` are in execution order.

    Attributes:
        name: family name (``llama``, ``gemma3``).
        model_types: HF ``config.model_type`` values this entry covers.
        gguf_arch: GGUF ``general.architecture`` for each model type (same order).
        blocks: path of the ``nn.ModuleList`` of decoder blocks.
        embed / final_norm / lm_head: paths of the token embedding, last norm and LM head.
        gguf_embed / gguf_final_norm / gguf_lm_head: their GGUF tensor stems.
        linears: the linear roles inside a block, in execution order.
        block_norms: the norms inside a block (hidden-size and head-dim ones).
        gguf_norm_offset: GGUF stores ``weight + offset`` for every norm (gemma: 1.0,
            because Gemma's RMSNorm scales by ``1 + weight``).
        gguf_rope_permute_qk: llama.cpp's converter reorders q/k rows from HF's rotate-half
            layout to interleaved pairs for this family (llama, mistral), not for others.
        embed_scale: the embedding output is multiplied by ``sqrt(hidden_size)`` (gemma).
    """

    name: str
    model_types: tuple[str, ...]
    gguf_arch: tuple[str, ...]
    linears: tuple[LinearRole, ...]
    block_norms: tuple[NormRole, ...]
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    gguf_embed: str = "token_embd"
    gguf_final_norm: str = "output_norm"
    gguf_lm_head: str = "output"
    gguf_norm_offset: float = 0.0
    gguf_rope_permute_qk: bool = False
    embed_scale: bool = False

    @property
    def block_roles(self) -> tuple[LinearRole | NormRole, ...]:
        """Every role inside a block: the linears, then the norms."""
        return (*self.linears, *self.block_norms)

    def linear(self, role: str) -> LinearRole:
        """The linear with this role (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``)."""
        for r in self.linears:
            if r.role == role:
                return r
        raise KeyError(f"{self.name} has no linear role {role!r}")

    def gguf_name(self, role: str, layer: int | None = None, suffix: str = "weight") -> str:
        """GGUF tensor name of a role: a linear/norm role with ``layer``, or ``embed``,
        ``final_norm``, ``lm_head`` without it."""
        top = {"embed": self.gguf_embed, "final_norm": self.gguf_final_norm,
               "lm_head": self.gguf_lm_head}
        if role in top:
            return f"{top[role]}.{suffix}"
        if layer is None:
            raise ValueError(f"role {role!r} lives inside a block: pass layer=")
        for r in self.block_roles:
            if r.role == role:
                return f"{r.gguf.format(i=layer)}.{suffix}"
        raise KeyError(f"{self.name} has no role {role!r}")

    def gguf_names(self, model: nn.Module) -> dict[str, str]:
        """Map every parameter name of ``model`` (HF naming) to its GGUF tensor name.

        A tied ``lm_head`` is left out (GGUF omits ``output.weight`` when tied).
        """
        out: dict[str, str] = {}
        for stem, gguf in ((self.embed, self.gguf_embed), (self.final_norm, self.gguf_final_norm),
                           (self.lm_head, self.gguf_lm_head)):
            out[f"{stem}.weight"] = f"{gguf}.weight"
        if is_tied(model):
            del out[f"{self.lm_head}.weight"]
        for i, block in enumerate(block_list(model, self)):
            for r in self.block_roles:
                mod = block.get_submodule(r.path)
                for suffix in ("weight", "bias"):
                    if getattr(mod, suffix, None) is not None:
                        hf = f"{self.blocks}.{i}.{r.path}.{suffix}"
                        out[hf] = f"{r.gguf.format(i=i)}.{suffix}"
        return out

    def dims(self, config: Any) -> dict[str, int]:
        """Sizes of every dimension tag for a HF config."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {HIDDEN: config.hidden_size, INTER: config.intermediate_size,
                Q_ROPE: heads * head_dim, K_ROPE: kv * head_dim, KV_VALUE: kv * head_dim,
                Q_VALUE: heads * head_dim, HEAD_DIM: head_dim, VOCAB: config.vocab_size,
                "heads": heads, "kv_heads": kv}


_ATTN_MLP = (
    LinearRole("q", "self_attn.q_proj", "blk.{i}.attn_q", HIDDEN, Q_ROPE),
    LinearRole("k", "self_attn.k_proj", "blk.{i}.attn_k", HIDDEN, K_ROPE),
    LinearRole("v", "self_attn.v_proj", "blk.{i}.attn_v", HIDDEN, KV_VALUE),
    LinearRole("o", "self_attn.o_proj", "blk.{i}.attn_output", Q_VALUE, HIDDEN),
    LinearRole("gate", "mlp.gate_proj", "blk.{i}.ffn_gate", HIDDEN, INTER),
    LinearRole("up", "mlp.up_proj", "blk.{i}.ffn_up", HIDDEN, INTER),
    LinearRole("down", "mlp.down_proj", "blk.{i}.ffn_down", INTER, HIDDEN),
)

LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    gguf_arch=("llama", "llama", "qwen2"),
    linears=_ATTN_MLP,
    block_norms=(
        NormRole("attn_norm", "input_layernorm", "blk.{i}.attn_norm", HIDDEN),
        NormRole("ffn_norm", "post_attention_layernorm", "blk.{i}.ffn_norm", HIDDEN),
    ),
    gguf_rope_permute_qk=True,  # llama, mistral; qwen2 is not permuted, see rope_permute_qk()
)

GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text",),
    gguf_arch=("gemma3",),
    linears=_ATTN_MLP,
    block_norms=(
        NormRole("attn_norm", "input_layernorm", "blk.{i}.attn_norm", HIDDEN),
        NormRole("post_attn_norm", "post_attention_layernorm", "blk.{i}.post_attention_norm",
                 HIDDEN),
        NormRole("ffn_norm", "pre_feedforward_layernorm", "blk.{i}.ffn_norm", HIDDEN),
        NormRole("post_ffn_norm", "post_feedforward_layernorm", "blk.{i}.post_ffw_norm", HIDDEN),
        NormRole("q_norm", "self_attn.q_norm", "blk.{i}.attn_q_norm", HEAD_DIM),
        NormRole("k_norm", "self_attn.k_norm", "blk.{i}.attn_k_norm", HEAD_DIM),
    ),
    gguf_norm_offset=1.0,
    embed_scale=True,
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, GEMMA3)


def supported_model_types() -> list[str]:
    """Every HF ``model_type`` with a table entry."""
    return [t for spec in ARCHITECTURES for t in spec.model_types]


def spec_for(config_or_model: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a HF config or model.

    Raises:
        UnsupportedArchitectureError: the model type has no entry; the message lists those
            that do.
    """
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    hint = ""
    if model_type in ("gemma3", "gemma3n"):
        hint = " (for Gemma 3 load the text-only model, Gemma3ForCausalLM / gemma3_text)"
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported{hint}; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def gguf_arch_for(config_or_model: Any) -> str:
    """GGUF ``general.architecture`` for a HF config or model."""
    config = getattr(config_or_model, "config", config_or_model)
    spec = spec_for(config)
    return spec.gguf_arch[spec.model_types.index(config.model_type)]


def rope_permute_qk(config_or_model: Any) -> bool:
    """Whether llama.cpp's converter reorders q/k rows for this model (llama and mistral do)."""
    spec = spec_for(config_or_model)
    return spec.gguf_rope_permute_qk and gguf_arch_for(config_or_model) == "llama"


def block_list(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    spec = spec or spec_for(model)
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.blocks} of {type(model).__name__} is not a "
                                           "ModuleList; the model does not match its table entry")
    return blocks


def is_tied(model: nn.Module, spec: ArchSpec | None = None) -> bool:
    """Whether ``lm_head`` shares its weight with the token embedding."""
    spec = spec or spec_for(model)
    head, embed = weight_of(model, spec.lm_head), weight_of(model, spec.embed)
    return head is embed or head.data_ptr() == embed.data_ptr()


def weight_of(module: nn.Module, path: str) -> torch.Tensor:
    """The ``weight`` parameter of the submodule at ``path``."""
    w = module.get_submodule(path).weight
    if not isinstance(w, torch.Tensor):
        raise UnsupportedArchitectureError(f"{path} has no weight tensor")
    return w


def linear_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the linears inside the blocks, in execution order.

    Example: ``['model.layers.0.self_attn.q_proj', ..., 'model.layers.29.mlp.down_proj']``.
    """
    spec = spec_for(model)
    n = len(block_list(model, spec))
    return [f"{spec.blocks}.{i}.{r.path}" for i in range(n) for r in spec.linears]
