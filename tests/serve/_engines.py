"""Small deterministic engines for serving tests: a scripted byte-level engine whose reply is
given text whatever the prompt, and a paced copy of the real ``cycle_engine`` (a transformers
forward pass) with a chat template, slow enough to watch stream and to stop."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgequant.engine import Engine, EngineState
from edgequant.engine.torch_engine import TorchEngine

from ..engine._models import cycle_engine

BOS, EOS = 256, 257


class ScriptState(EngineState):
    """A state that remembers where its prompt ended (its first forward pass)."""

    prompt_len: int | None = None


class ScriptEngine(Engine):
    """A byte-level engine whose greedy answer to any prompt is ``reply``, then EOS.

    The logits at position ``q`` put all the mass on byte ``q + 1 - prompt_len`` of the
    reply: the next token depends on the position, not on the last token, so a reply may
    repeat bytes (``<img src=x onerror=alert(1)>`` does). ``delay`` seconds are slept per
    forward pass, so a long reply streams slowly enough to stop.
    """

    backend = "script"
    bos_id = BOS
    eos_id = EOS
    add_bos = True
    vocab_size = 258
    max_context = 4096
    threads = 1

    def __init__(self, reply: str, name: str = "script", delay: float = 0.0) -> None:
        self.reply = list(reply.encode())
        self.name = name
        self.delay = delay

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    @property
    def chat_template(self) -> str | None:
        return "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"

    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def new_state(self, capacity: int | None = None) -> ScriptState:
        return ScriptState(self, self.max_context if capacity is None else int(capacity))

    def _forward(self, state: EngineState, ids: Sequence[int], rows: int) -> np.ndarray:
        assert isinstance(state, ScriptState)
        if self.delay:
            time.sleep(self.delay)
        if state.prompt_len is None:
            state.prompt_len = len(ids)
        end = len(state.tokens) + len(ids)          # positions [end - rows, end) are scored
        out = np.zeros((rows, self.vocab_size), dtype=np.float32)
        for r, q in enumerate(range(end - rows, end)):
            k = q + 1 - state.prompt_len
            out[r, self.reply[k] if 0 <= k < len(self.reply) else EOS] = 30.0
        return out

    def _rewind(self, state: EngineState, n: int) -> None:
        pass

    def _release(self, state: EngineState) -> None:
        pass


class PacedTorchEngine(TorchEngine):
    """A torch engine that sleeps ``delay`` seconds before each forward pass."""

    def __init__(self, module: Any, tokenizer: Any, name: str, delay: float) -> None:
        super().__init__(module, tokenizer, name)
        self.delay = delay

    def _forward(self, state: EngineState, ids: Sequence[int], rows: int) -> np.ndarray:
        time.sleep(self.delay)
        return super()._forward(state, ids, rows)


# The cycle's bytes must be distinct; it holds ":" so that the chat prompt's last byte (the
# template ends with "assistant:") continues into it.
CYCLE = "Mango: juicy!"


def cycle_reply(n: int) -> str:
    """The greedy reply of :func:`chat_cycle_engine` to any chat: ``n`` bytes of the cycle
    after its ":"."""
    i = CYCLE.index(":") + 1
    return "".join(CYCLE[(i + k) % len(CYCLE)] for k in range(n))


def chat_cycle_engine(name: str = "cycle", delay: float = 0.0) -> TorchEngine:
    """The real ``cycle_engine`` forward pass with a byte-level chat template (``role:
    content`` lines, then ``assistant:``), optionally paced."""
    from ..eval._tiny import CHAT_TEMPLATE

    base = cycle_engine(CYCLE)
    base.tokenizer.chat_template = CHAT_TEMPLATE
    if not delay:
        base.name = name
        return base
    return PacedTorchEngine(base.module, base.tokenizer, name, delay)
