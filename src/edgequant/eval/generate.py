"""Generations: a fixed prompt set, greedy, fixed length — to read what quantization did.

Each prompt goes through the model's chat template (user turn, assistant turn opened) when
its tokenizer has one; BOS is prepended when the tokenizer adds it by default and the
formatted prompt does not already start with it. Decoding is greedy and stops at EOS or
after ``max_new_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io_utils import atomic_file

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 3?",
)
MAX_NEW_TOKENS = 64


def prompt_ids(runnable: Any, prompt: str) -> tuple[str, list[int], bool]:
    """The text actually fed, its ids, and whether the chat template was used."""
    chat = runnable.chat_prompt(prompt)
    text = chat if chat is not None else prompt
    ids = runnable.tokenize(text, special=chat is not None)
    if runnable.add_bos and ids[:1] != [runnable.bos_id]:
        ids = [runnable.bos_id, *ids]
    return text, ids, chat is not None


def generate_samples(runnable: Any, prompts: Sequence[str] = PROMPTS,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts``: prompt, formatted text, output text and ids."""
    out = []
    for p in prompts:
        text, ids, chat = prompt_ids(runnable, p)
        new = runnable.generate(ids, max_new_tokens)
        out.append({"prompt": p, "chat_template": chat, "input": text,
                    "input_tokens": len(ids), "output": runnable.detokenize(new),
                    "output_ids": new})
    return out


def save_generations(path: str | Path, samples: list[dict[str, Any]],
                     meta: dict[str, Any]) -> Path:
    """Write ``{"meta": …, "samples": […]}`` as JSON (atomically)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "samples": samples}, indent=2,
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    return path
