"""Generations: a fixed prompt set, greedy, fixed length — to read what quantization did.

Through the engine (:meth:`~edgequant.engine.Engine.generate`): each prompt goes through the
model's chat template (user turn, assistant turn opened) when it has one; BOS is prepended
when the tokenizer adds it by default and the formatted prompt does not already start with
it. Decoding is greedy and stops at an end-of-generation token or after ``max_new_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.base import Engine
from ..engine.sampling import SamplingParams
from ..io_utils import atomic_file

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 3?",
)
MAX_NEW_TOKENS = 64


def prompt_ids(engine: Engine, prompt: str) -> tuple[str, list[int], bool]:
    """The text actually fed, its ids, and whether the chat template was used."""
    chat = engine.chat_template is not None
    text = engine.apply_chat_template([{"role": "user", "content": prompt}]) if chat \
        else prompt
    return text, engine.encode_prompt(text), chat


def generate_samples(engine: Engine, prompts: Sequence[str] = PROMPTS,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts``: prompt, formatted text, output text and ids."""
    params = SamplingParams(max_tokens=max_new_tokens)   # greedy
    out = []
    for p in prompts:
        text, ids, chat = prompt_ids(engine, p)
        res = engine.generate(ids, params)
        out.append({"prompt": p, "chat_template": chat, "input": text,
                    "input_tokens": len(ids), "output": res.text,
                    "output_ids": res.token_ids, "finish_reason": res.finish_reason})
    return out


def save_generations(path: str | Path, samples: list[dict[str, Any]],
                     meta: dict[str, Any]) -> Path:
    """Write ``{"meta": …, "samples": […]}`` as JSON (atomically)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "samples": samples}, indent=2,
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    return path
