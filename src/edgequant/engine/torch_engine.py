"""The torch engine: a transformers causal-LM module and its tokenizer.

Each state owns a transformers ``DynamicCache`` (built from the model's config, so
sliding-window layers keep only their window): states are independent tensors, and any
number of them may be alive at once. A forward pass appends to the state's cache and asks
the module for the last ``rows`` positions' logits only (``logits_to_keep``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

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
