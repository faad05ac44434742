"""The torch engine: a transformers causal-LM module and its tokenizer.

Each state owns a transformers ``DynamicCache`` (built from the model's config, so
sliding-window layers keep only their window): states are independent tensors, and any
number of them may be alive at once. A forward pass appends to the state's cache and asks
the module for the last ``rows`` positions' logits only (``logits_to_keep``).

A batched decode step (:meth:`TorchEngine.decode_batch`) runs the module once on B
sequences of different lengths: a stand-in cache hands each attention layer the states'
keys and values left-padded to the longest, a 4-D mask hides the padding, and each row
gets its own position. Full-attention models (Llama, SmolLM2) keep the padded batch in an
arena between steps (:class:`_Arena`: a step writes one column, and each state's cache
holds a view of its row — no copies while the batch stays the same); models with sliding
window layers (Gemma 3) pad anew each step (:class:`_BatchCache`) and append the new keys
and values through each state's own cache layer after the pass, so a window is kept as
decoding alone keeps it. Either way a state afterwards holds what decoding alone would
have made, and a failed pass changes no state. Masked attention shares grouped-query
heads inside ``scaled_dot_product_attention`` (transformers' sdpa copies them per query
head whenever there is a mask). Other caches, and attention other than sdpa or eager,
decode per state.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..data.tokens import HFTextTokenizer
from ..errors import ModelLoadError
from .base import Engine, EngineState
from .sampling import EngineError

# tokens llama.cpp also ends generation at when the vocabulary marks them special
# (llama-vocab.cpp's end-of-generation list): the two backends stop at the same tokens
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
               "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
               "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>")


class TorchState(EngineState):
    """A state with its own KV cache."""

    def __init__(self, engine: Engine, capacity: int, cache: Any) -> None:
        super().__init__(engine, capacity)
        self.cache: Any = cache


class TorchEngine(Engine):
    """A transformers module and tokenizer as an :class:`~edgequant.engine.Engine`.

    Args:
        module: a causal LM (eval mode); it computes where it is (never moved).
        tokenizer: its transformers tokenizer (its ``chat_template`` is the chat template).
        name: a display name.
    """

    backend = "torch"

    def __init__(self, module: Any, tokenizer: Any, name: str = "model") -> None:
        self.module: Any = module
        self.tokenizer: Any = tokenizer
        self.name = name
        self._tok = HFTextTokenizer(tokenizer)
        if self._tok.bos_id is None:
            raise ModelLoadError(f"the tokenizer of {name} has neither a BOS nor an EOS "
                                 "token; edgequant starts every sequence with one")
        self.bos_id: int = self._tok.bos_id
        self.eos_id: int | None = tokenizer.eos_token_id
        first = tokenizer("a")["input_ids"][:1]
        self.add_bos = tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]
        config: Any = module.config
        text_config: Any = config.get_text_config() if hasattr(config, "get_text_config") \
            else config
        self.vocab_size: int = int(text_config.vocab_size)
        self.max_context: int = int(getattr(text_config, "max_position_embeddings", 1 << 20))
        self._eog = _end_of_generation(module, tokenizer)
        self._arena: _Arena | None = None   # the last batched step's keys and values

    @property
    def threads(self) -> int:  # type: ignore[override]
        return torch.get_num_threads()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's unquantized float weights: what it computes in."""
        emb = self.module.get_input_embeddings()
        return emb.weight.dtype if emb is not None else torch.float32  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        for t in itertools.chain(self.module.parameters(), self.module.buffers()):
            return t.device  # type: ignore[no-any-return]
        return torch.device("cpu")

    def _compute(self) -> AbstractContextManager[Any]:
        """The autograd mode every forward runs in (a subclass may need ``no_grad``)."""
        return torch.inference_mode()

    # --- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._tok.tokenize(text, special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return str(self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt))

    # --- states ---------------------------------------------------------------------------

    def new_state(self, capacity: int | None = None) -> TorchState:
        from transformers import DynamicCache

        cap = self.max_context if capacity is None else int(capacity)
        if not 0 < cap <= self.max_context:
            raise EngineError(f"a state's capacity must be in [1, {self.max_context}] (the "
                              f"model's context), got {cap}")
        return TorchState(self, cap, DynamicCache(config=self.module.config))

    def _forward(self, state: EngineState, ids: Sequence[int], rows: int) -> np.ndarray:
        assert isinstance(state, TorchState)
        with self._compute():
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            out = self.module(input_ids=x, past_key_values=state.cache, use_cache=True,
                              logits_to_keep=max(rows, 1))   # 0 would mean every position
            state.cache = out.past_key_values
            logits = out.logits[0, out.logits.shape[1] - rows:]        # (rows, V)
            return logits.float().cpu().numpy()  # type: ignore[no-any-return]

    def _decode_batch(self, states: list[EngineState], tokens: list[int]) -> np.ndarray:
        """One module forward for all states (see the module's docstring); a cache this does
        not know how to batch (or one state) decodes per state instead."""
        sts = [s for s in states if isinstance(s, TorchState)]
        kinds = self._batch_kinds(sts) if len(sts) == len(states) > 1 else None
        if kinds is None:
            return super()._decode_batch(states, tokens)
        attn = self.module.config._attn_implementation
        lengths = [len(s.tokens) for s in sts]
        if set(kinds) == {"full"}:
            arena = self._arena if self._arena is not None and self._arena.serves(sts) \
                else _Arena(sts, len(kinds))
            self._arena = None            # until this step succeeded
            cache: Any = _ArenaCache(arena)
            mask: Any = _mask(lengths, arena.t + 1, attn, self.dtype, self.device)
        else:
            cache = _BatchCache([s.cache for s in sts], kinds)
            masks = cache.masks(attn, self.dtype, self.device)
            if masks is None:
                return super()._decode_batch(states, tokens)
            mask = masks[kinds[0]] if len(set(kinds)) == 1 else \
                {"full_attention": masks["full"], "sliding_attention": masks["sliding"]}
        dev = self.device
        with self._compute(), _gqa_attention(self.module.config):
            x = torch.tensor([[t] for t in tokens], dtype=torch.long, device=dev)
            pos = torch.tensor([[n] for n in lengths], dtype=torch.long, device=dev)
            out = self.module(input_ids=x, position_ids=pos, attention_mask=mask,
                              past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float().cpu().numpy()
            cache.commit()
        if isinstance(cache, _ArenaCache):
            self._arena = cache.arena
        return logits  # type: ignore[no-any-return]

    def _batch_kinds(self, states: list[TorchState]) -> list[str] | None:
        """Each layer's kind (``"full"`` | ``"sliding"``) when these states' caches can be
        batched, else None: plain transformers ``DynamicCache`` layers of full attention or
        a sliding window, under the sdpa or eager attention (whose masks this builds); a
        model mixing both kinds must name them in ``config.layer_types`` (it then takes one
        mask per kind)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        config = self.module.config
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return None
        kinds: list[str] | None = None
        for st in states:
            cache = st.cache
            if type(cache) is not DynamicCache or cache.offloading:
                return None
            these = []
            for layer in cache.layers:
                if type(layer) is DynamicLayer:
                    these.append("full")
                elif type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
                    these.append("sliding")
                else:
                    return None
            if kinds is None:
                kinds = these
            elif these != kinds:
                return None
        if not kinds:
            return None
        if len(set(kinds)) > 1:
            types = getattr(config.get_text_config(), "layer_types", None)
            want = ["sliding" if t == "sliding_attention" else "full" if t == "full_attention"
                    else t for t in (types or [])]
            if want[:len(kinds)] != kinds:
                return None
        return kinds

    def _rewind(self, state: EngineState, n: int) -> None:
        assert isinstance(state, TorchState)
        try:
            state.cache.crop(n)
        except (ValueError, NotImplementedError, RuntimeError) as e:
            raise EngineError(f"this model's cache cannot be rewound ({e}); evaluate the "
                              "prefix again on a new state") from None

    def _release(self, state: EngineState) -> None:
        assert isinstance(state, TorchState)
        state.cache = None
        if self._arena is not None and any(s is state for s in self._arena.states):
            self._arena = None            # its buffers hold this state's keys and values


def _cached(layer: Any) -> torch.Tensor | None:
    """A cache layer's keys ``(1, H, T, D)``, or None while it holds nothing."""
    keys = layer.keys if layer.is_initialized else None
    return keys if keys is not None and keys.numel() else None


def _mask(lengths: list[int], width: int, attn: str, dtype: torch.dtype, device: torch.device
          ) -> torch.Tensor:
    """The ``(B, 1, 1, width)`` attention mask of rows right-aligned in ``width`` columns:
    row ``i`` sees its last ``lengths[i] + 1`` (bool for sdpa, additive for eager)."""
    n = torch.tensor(lengths, device=device)
    see = torch.arange(width, device=device)[None, :] >= (width - 1 - n)[:, None]
    mask = see[:, None, None, :]
    if attn == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    return mask


_GQA_SDPA = "edgequant_masked_gqa_sdpa"


def _masked_gqa_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention for a masked decode step, with grouped-query heads
    shared inside ``scaled_dot_product_attention`` (``enable_gqa``): transformers' own
    copies the keys and values once per query head whenever a mask is given — the largest
    avoidable cost of a batched step (several times the attention itself)."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _gqa_attention(config: Any) -> Iterator[None]:
    """Run the module's sdpa attention layers on :func:`_masked_gqa_sdpa` while inside."""
    if config._attn_implementation != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    if _GQA_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GQA_SDPA, _masked_gqa_sdpa)
    config._attn_implementation = _GQA_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class _Arena:
    """The keys and values of a batch of full-attention states, kept between steps.

    Per layer one ``(B, H, C, D)`` buffer holds every row right-aligned at column ``t``
    (row ``i`` in ``[t − len_i, t)``, zeros before it, masked); a step writes column ``t``
    and attention reads columns ``[0, t]`` — views, no copies. Each state's cache layer then
    holds a view of its row, exactly the tensor decoding alone would have made (only its
    memory is shared), so a state can leave the batch, decode alone or be rewound at any
    time: that replaces its view, and the next batched step sees the change
    (:meth:`serves`) and builds a new arena from the states' caches — one copy per change
    of the batch, where padding anew each step would copy every cache at every step.
    """

    SLACK = 256          # columns past the longest row a (re)built buffer leaves room for

    def __init__(self, states: list[TorchState], layers: int) -> None:
        self.states = states
        self.lengths = [len(s.tokens) for s in states]
        self.t = max(self.lengths)
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.views: list[list[tuple[Any, Any]]] = []   # per state, per layer

    def serves(self, states: list[TorchState]) -> bool:
        """Whether these states, in this order, still hold exactly the views it gave them."""
        if len(states) != len(self.states) or not self.views:
            return False
        for st, mine, n, views in zip(states, self.states, self.lengths, self.views,
                                      strict=True):
            if st is not mine or len(st.tokens) != n:
                return False
            for layer, (k, v) in zip(st.cache.layers, views, strict=True):
                if layer.keys is not k or layer.values is not v:
                    return False
        return True

    def update(self, j: int, key: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``j``'s new column; its keys and values ``[:, :, :t + 1]``."""
        kbuf, vbuf = self.keys[j], self.values[j]
        if kbuf is None or vbuf is None or self.t >= kbuf.shape[2]:
            kbuf, vbuf = self._buffers(j, key, value)
        t = self.t
        kbuf[:, :, t] = key[:, :, 0]
        vbuf[:, :, t] = value[:, :, 0]
        return kbuf[:, :, :t + 1], vbuf[:, :, :t + 1]

    def _buffers(self, j: int, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``j``'s buffers, made (from the states' caches) or grown (from the old)."""
        b, h, _, d = key.shape
        room = max(s.capacity - n for s, n in zip(self.states, self.lengths, strict=True))
        width = self.t + max(1, min(room, self.SLACK))
        old = (self.keys[j], self.values[j])
        new = []
        for buf, x in zip(old, (key, value), strict=True):
            fresh = x.new_zeros((b, h, width, d))
            if buf is not None:
                fresh[:, :, :self.t] = buf[:, :, :self.t]
            else:
                for i, st in enumerate(self.states):
                    n = self.lengths[i]
                    if n:
                        part = st.cache.layers[j]
                        src = part.keys if x is key else part.values
                        fresh[i, :, self.t - n:self.t] = src[0]
            new.append(fresh)
        self.keys[j], self.values[j] = new
        return new[0], new[1]

    def commit(self) -> None:
        """The step succeeded: each state's layers become views of its row, one longer."""
        t = self.t + 1
        self.lengths = [n + 1 for n in self.lengths]
        self.views = []
        for i, st in enumerate(self.states):
            views = []
            lo = t - self.lengths[i]
            for layer, kbuf, vbuf in zip(st.cache.layers, self.keys, self.values,
                                         strict=True):
                assert kbuf is not None and vbuf is not None
                if not layer.is_initialized:
                    layer.lazy_initialization(kbuf[i:i + 1, :, :0], vbuf[i:i + 1, :, :0])
                layer.keys, layer.values = kbuf[i:i + 1, :, lo:t], vbuf[i:i + 1, :, lo:t]
                views.append((layer.keys, layer.values))
            self.views.append(views)
        self.t = t


class _ArenaLayer(CacheLayerMixin):
    """Layer ``j`` of an :class:`_Arena` as a transformers cache layer."""

    is_sliding = False

    def __init__(self, arena: _Arena, j: int) -> None:
        super().__init__()
        self.arena, self.j = arena, j

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.arena.update(self.j, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.arena.t + query_length, 0

    def get_seq_length(self) -> int:
        return self.arena.t

    def get_max_length(self) -> int:
        return -1


class _ArenaCache(Cache):
    """The ``past_key_values`` of a batched step on an :class:`_Arena`."""

    def __init__(self, arena: _Arena) -> None:
        super().__init__(layers=[_ArenaLayer(arena, j) for j in range(len(arena.keys))])
        self.arena = arena

    def commit(self) -> None:
        self.arena.commit()


class _BatchLayer(CacheLayerMixin):
    """One attention layer of a batched step: the states' layers (``parts``, one per row)
    seen as one left-padded batch. The new keys and values are held back until
    :meth:`commit`, so a failed forward leaves every state as it was."""

    def __init__(self, parts: list[Any], kind: str) -> None:
        super().__init__()
        self.parts = parts
        self.is_sliding = kind == "sliding"
        self.lengths = [0 if (k := _cached(p)) is None else int(k.shape[-2]) for p in parts]
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values attention sees: row ``i`` is state ``i``'s cached ones then
        its new one, right-aligned in ``max(len) + 1`` columns (zeros before, masked)."""
        self.new = (key_states, value_states)
        b, h, _, d = key_states.shape
        width = max(self.lengths) + 1
        keys = key_states.new_zeros((b, h, width, d))
        values = value_states.new_zeros((b, h, width, d))
        for i, (part, n) in enumerate(zip(self.parts, self.lengths, strict=True)):
            if n:
                keys[i, :, width - 1 - n:width - 1] = part.keys[0]
                values[i, :, width - 1 - n:width - 1] = part.values[0]
        keys[:, :, width - 1:] = key_states
        values[:, :, width - 1:] = value_states
        return keys, values

    def commit(self) -> None:
        """Append each row's new key and value to its state's layer, as decoding alone."""
        if self.new is None:
            raise RuntimeError("a batched forward pass skipped an attention layer")
        k, v = self.new
        for i, part in enumerate(self.parts):
            part.update(k[i:i + 1], v[i:i + 1])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(self.lengths) + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.lengths)

    def get_max_length(self) -> int:
        return -1


class _BatchCache(Cache):
    """The ``past_key_values`` of one batched decode step over several states' caches."""

    def __init__(self, caches: list[Any], kinds: list[str]) -> None:
        super().__init__(layers=[_BatchLayer([c.layers[j] for c in caches], kind)
                                 for j, kind in enumerate(kinds)])
        self.kinds = kinds

    def masks(self, attn: str, dtype: torch.dtype, device: torch.device
              ) -> dict[str, torch.Tensor] | None:
        """A ``(B, 1, 1, width)`` mask per layer kind: row ``i`` sees its last
        ``len_i + 1`` columns (bool for sdpa, additive for eager); None when two layers of
        one kind hold different lengths (one mask per kind could not serve them)."""
        out: dict[str, torch.Tensor] = {}
        for layer, kind in zip(self.layers, self.kinds, strict=True):
            assert isinstance(layer, _BatchLayer)
            mask = _mask(layer.lengths, max(layer.lengths) + 1, attn, dtype, device)
            if kind not in out:
                out[kind] = mask
            elif out[kind].shape != mask.shape or not torch.equal(out[kind], mask):
                return None
        return out

    def commit(self) -> None:
        for layer in self.layers:
            assert isinstance(layer, _BatchLayer)
            layer.commit()


def _end_of_generation(module: Any, tokenizer: Any) -> frozenset[int]:
    """EOS, the generation config's EOS ids, and the special end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(t) for t in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False) and str(added) in END_OF_TURN:
            ids.add(int(tid))
    return frozenset(ids)
