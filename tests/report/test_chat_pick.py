"""Which artifact `compare` tells the user to chat with (and how `edgequant serve` gets it)."""

from __future__ import annotations

from edgequant.comparison.store import ResultRow
from edgequant.report.recommend import chat_pick


def row(i: int, kind: str, label: str, ppl: float, size: float, kld: float,
        artifact: str | None = "a") -> ResultRow:
    return ResultRow(i, f"{i:064x}", 1, "m", kind, label.split()[0], label.split()[-1],
                     "edgequant", label, "e", {}, "t", artifact,
                     {"ppl": ppl, "size_mb": size, "kld_mean": kld})


BASE = row(1, "baseline", "baseline fp32", 10.0, 500, 0.0, None)


def test_smallest_servable_within_one_percent_of_the_baseline():
    rows = [BASE, row(2, "gguf", "gguf Q8_0", 10.05, 140, 0.01, "q8.gguf"),
            row(3, "native", "rtn w8", 10.08, 150, 0.02, "rtn8"),
            row(4, "peer", "bnb nf4", 10.09, 100, 0.03, "peer"),      # served by no engine
            row(5, "native", "rtn w4g128", 15.0, 110, 0.5, "rtn4")]
    assert chat_pick(rows).artifact == "q8.gguf"


def test_else_the_lowest_kld_under_the_middle_budget():
    rows = [BASE, row(2, "native", "rtn w4g128", 15.0, 111, 0.6, "rtn"),
            row(3, "native", "gptq w4g128", 13.0, 111, 0.4, "gptq"),
            row(4, "native", "gptq w3g128", 90.0, 98, 1.4, "gptq3")]
    assert chat_pick(rows).artifact == "gptq"


def test_nothing_servable_is_no_pick():
    assert chat_pick([BASE, row(2, "peer", "bnb nf4", 10.0, 100, 0.0, "p")]) is None
