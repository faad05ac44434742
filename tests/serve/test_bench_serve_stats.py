"""The serving benchmark's pure parts: statistics on known timings, ShareGPT parsing and
filtering on a small file, the closed-loop driver, target verdicts and the in-process engine
driver. No servers: the benchmark itself is run by hand (benchmarks/bench_serve.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_serve", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module     # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bs = _load()


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 5, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(n, q):
    xs = list(np.random.default_rng(n).exponential(size=n))
    assert bs.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_known_values_and_bad_input():
    assert bs.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5        # unsorted input
    assert bs.percentile([10.0, 20.0], 95) == pytest.approx(19.5)
    assert bs.percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        bs.percentile([1.0], 101)


def test_tpot_on_known_timings():
    assert bs.tpot(1.0, 0.1, 10) == pytest.approx(0.1)            # 0.9 s over 9 tokens
    assert bs.tpot(0.5, 0.5, 1) is None                           # one token: no TPOT
    assert bs.tpot(None, 0.1, 5) is None
    r = bs.RequestResult(True, ttft_s=0.2, latency_s=2.2, output_tokens=21)
    assert r.tpot_s == pytest.approx(0.1)


def test_summarize_known_level():
    ok = [bs.RequestResult(True, ttft_s=t, latency_s=t + 0.63, output_tokens=64,
                           prompt_tokens=100, itl_s=[0.01] * 63) for t in (0.1, 0.2, 0.3, 0.4)]
    short = bs.RequestResult(True, ttft_s=0.5, latency_s=0.6, output_tokens=11, prompt_tokens=50)
    bad = [bs.RequestResult(False, "503", retry_after="1"), bs.RequestResult(False, "503"),
           bs.RequestResult(False, "connection")]
    row = bs.summarize([*ok, short, *bad], wall_s=2.0, max_tokens=64)
    assert row["requests"] == 8 and row["ok"] == 5
    assert row["errors"] == {"503": 2, "connection": 1}
    assert row["output_tokens"] == 4 * 64 + 11 and row["prompt_tokens"] == 450
    assert row["output_tok_s"] == pytest.approx((4 * 64 + 11) / 2.0, abs=0.01)
    assert row["full_length"] == 4
    assert row["ttft_p50_ms"] == pytest.approx(300.0)            # median of .1 .2 .3 .4 .5
    assert row["tpot_p50_ms"] == pytest.approx(10.0)             # 0.63 s / 63 and 0.1 s / 10
    assert row["itl_p50_ms"] == pytest.approx(10.0)
    assert row["requests_s"] == pytest.approx(2.5)


def test_summarize_all_failed_has_no_percentiles():
    row = bs.summarize([bs.RequestResult(False, "500")], wall_s=1.0, max_tokens=8)
    assert row["ok"] == 0 and row["ttft_p50_ms"] is None and row["output_tok_s"] == 0


# --- ShareGPT ---------------------------------------------------------------------------------


def _fake_sharegpt(path: Path) -> Path:
    convs = [
        {"id": "a", "conversations": [{"from": "human", "value": "one two three four"},
                                      {"from": "gpt", "value": "ok"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "model first"},
                                      {"from": "human", "value": "then human"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "   "},
                                      {"from": "gpt", "value": "blank prompt"}]},
        {"id": "e", "conversations": [{"from": "human", "value": "x " * 40},
                                      {"from": "gpt", "value": "long"}]},
        {"id": "f", "conversations": [{"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "too short"}]},
        {"id": "g"},
        {"id": "h", "conversations": [{"from": "human", "value": "five words in this one"},
                                      {"from": "gpt", "value": "a"}, {"from": "human",
                                                                      "value": "later"}]},
    ]
    path.write_text(json.dumps(convs), encoding="utf-8")
    return path


def test_read_sharegpt_keeps_first_human_turns(tmp_path):
    turns = bs.read_sharegpt(_fake_sharegpt(tmp_path / "sg.json"))
    assert [i for i, _ in turns] == ["a", "e", "f", "h"]
    assert dict(turns)["h"] == "five words in this one"       # the first turn, not a later one


def test_read_sharegpt_refuses_a_non_list(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        bs.read_sharegpt(p)


def test_parse_conversations_cut_anywhere_gives_a_prefix():
    items = [{"id": "a", "n": 12, "ok": True, "x": None, "s": "q\"uote] ,"},
             {"id": "b", "conversations": [{"from": "human", "value": "é [1, 2]"}]},
             [1.5e3, False], "tail"]
    text = json.dumps(items, indent=2)
    assert bs.parse_conversations(text) == (items, False)
    assert bs.parse_conversations(" [ ] ") == ([], False)
    for cut in range(1, len(text)):
        got, truncated = bs.parse_conversations(text[:cut])
        assert truncated and got == items[:len(got)], cut
    assert bs.parse_conversations(text[:-1])[0] == items


def test_parse_conversations_refuses_malformed_text():
    with pytest.raises(ValueError, match="JSON list"):
        bs.parse_conversations('{"id": 1}')
    with pytest.raises(ValueError, match="malformed"):
        bs.parse_conversations('[{"id": 1} {"id": 2}]')
    with pytest.raises(ValueError, match="malformed"):
        bs.parse_conversations('[{"id": 1}, {"id": nope}, {"id": 3}]')


def test_read_sharegpt_reads_a_truncated_file(tmp_path):
    full = _fake_sharegpt(tmp_path / "sg.json").read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(full[: full.index('"id": "h"') + 20])       # inside the last conversation
    assert [i for i, _ in bs.read_sharegpt(cut)] == ["a", "e", "f"]


def test_sample_prompts_filters_by_tokens_and_is_seeded(tmp_path):
    turns = bs.read_sharegpt(_fake_sharegpt(tmp_path / "sg.json"))
    calls = []

    def count(text):
        calls.append(text)
        return len(text.split())

    picked = bs.sample_prompts(turns, count, 2, seed=3, min_tokens=3, max_tokens=10)
    assert {p.id for p in picked} == {"a", "h"}                  # "e" has 40, "f" has 1
    assert all(p.tokens == len(p.text.split()) for p in picked)
    assert picked[0].messages == [{"role": "user", "content": picked[0].text}]
    again = bs.sample_prompts(turns, count, 2, seed=3, min_tokens=3, max_tokens=10)
    assert again == picked
    orders = {tuple(p.id for p in bs.sample_prompts(turns, count, 2, seed=s, min_tokens=3,
                                                    max_tokens=10)) for s in range(20)}
    assert orders == {("a", "h"), ("h", "a")}                   # the seed picks the order
    calls.clear()
    bs.sample_prompts(turns, count, 1, seed=0, min_tokens=1, max_tokens=100)
    assert len(calls) == 1                                        # tokenizes only what it needs
    with pytest.raises(ValueError, match="only 2 of 4"):
        bs.sample_prompts(turns, count, 3, seed=0, min_tokens=3, max_tokens=10)


# --- drivers ----------------------------------------------------------------------------------


def test_closed_loop_bounds_concurrency_and_keeps_order():
    live, peak = 0, 0

    async def make(i):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.001 * (i % 3))
        live -= 1
        return i * i

    results, wall = asyncio.run(bs.closed_loop(make, 11, 3))
    assert results == [i * i for i in range(11)]
    assert peak == 3 and wall > 0


@pytest.mark.parametrize("concurrency", [1, 3])
def test_direct_level_counts_every_token(concurrency):
    from tests.engine._models import cycle_engine
    from tests.eval._tiny import CHAT_TEMPLATE

    engine = cycle_engine("abcdefg", then_eos=True)       # EOS after 7 tokens: ignore_eos holds
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    prompts = [bs.Prompt(str(i), "abc"[: i % 3 + 1], i % 3 + 1) for i in range(5)]
    results, wall, mode = bs.direct_level(engine, prompts, concurrency, 12)
    assert mode == "step" if concurrency == 1 else mode in ("step_batch", "round-robin step")
    assert all(r.ok and r.output_tokens == 12 for r in results)
    assert all(0 < r.ttft_s <= r.latency_s <= wall for r in results)
    assert all(len(r.itl_s) <= 11 for r in results)
    assert all(r.prompt_tokens == len(engine.encode_prompt(
        engine.apply_chat_template(p.messages))) for r, p in zip(results, prompts, strict=True))


def test_rss_of_this_process_and_of_none():
    assert bs.rss_bytes(os.getpid()) > 10 * 2**20
    assert bs.rss_bytes(2**22 + 12345) is None                  # above Linux's pid_max
    with bs.RssSampler(os.getpid(), interval=0.01) as s:
        sum(range(10**5))
    summary = s.summary()
    assert len(s.samples) >= 2
    assert summary["rss_start_mib"] <= summary["rss_max_mib"] >= summary["rss_end_mib"] > 0


# --- targets and report -----------------------------------------------------------------------


def _row(target, c, tok_s):
    return {"target": target, "concurrency": c, "output_tok_s": tok_s}


def test_targets_met_and_missed():
    data = {"rows": [_row("ours", 1, 97.0), _row("direct", 1, 100.0),
                     _row("llama-server", 1, 100.0),
                     _row("ours", 4, 150.0), _row("llama-server", 4, 200.0),
                     _row("ours-native", 1, 10.0), _row("ours-native", 4, 25.0)],
            "overload": {"statuses": {"200": 6, "503": 6}, "rejected_with_retry_after": 6,
                         "other_failures": {}, "after_ok": 2, "after_requests": 2,
                         "concurrent_requests": 12},
            "soak": {"rss_drift": 0.08, "errors": {}, "rss_after_mark_mib": 100,
                     "rss_end_mib": 108, "mark": 50, "requests": 500}}
    t = {x["target"].split(" ")[0] + str(i): x for i, x in enumerate(bs.evaluate_targets(data))}
    assert t["server0"]["met"] is True and t["server0"]["value"] == pytest.approx(0.03)
    assert t["GGUF1"]["met"] is True and t["GGUF1"]["value"] == pytest.approx(0.97)
    assert t["GGUF2"]["met"] is False and t["GGUF2"]["value"] == pytest.approx(0.75)
    assert t["native3"]["met"] is True and t["native3"]["value"] == pytest.approx(2.5)
    assert t["no4"]["met"] is True
    assert t["RSS5"]["met"] is False and t["RSS5"]["value"] == pytest.approx(0.08)


def test_targets_not_measured_and_overload_failures():
    data = {"rows": [_row("ours", 1, 90.0)],
            "overload": {"statuses": {"200": 5, "503": 6, "500": 1}, "rejected_with_retry_after": 6,
                         "other_failures": {"500": 1}, "after_ok": 2, "after_requests": 2,
                         "concurrent_requests": 12}, "soak": None}
    targets = bs.evaluate_targets(data)
    assert [x["met"] for x in targets] == [None, None, None, None, False, None]


def test_markdown_has_a_table_per_target_and_the_verdicts():
    s = bs.parse_args(["--levels", "1,4"])[0]
    data = {"command": "python benchmarks/bench_serve.py", "started": "now",
            "settings": bs.asdict(s), "machine": bs.machine(), "load_average_before": [0.1],
            "load_average_after": [0.2], "servers": {"ours": {"command": ["serve", "x"],
                                                              "ignore_eos": False}},
            "rows": [{**_row("ours", 1, 90.0), "errors": {}}, {**_row("direct", 1, 100.0),
                                                               "errors": {}, "mode": "step"}],
            "overload": None, "soak": None}
    data["targets"] = bs.evaluate_targets(data)
    md = bs.to_markdown(data)
    assert "## ours" in md and "## direct" in md and "`serve x` — ignore_eos not taken" in md
    assert "| 1 |" in md and "Stepping: step." in md
    assert "| **missed** |" in md and md.count("| not measured |") == 5


def test_args_refuse_prompts_that_do_not_fit_and_unknown_targets():
    with pytest.raises(SystemExit):
        bs.parse_args(["--ctx", "256", "--prompt-max-tokens", "200"])
    with pytest.raises(SystemExit):
        bs.parse_args(["--targets", "ours,vllm"])
    s, a = bs.parse_args(["--quick"])
    assert s.levels == (1, 2) and s.n_requests(2) == 4 and s.max_tokens == 16


def test_per_level_slices_are_disjoint_and_sized():
    s = bs.parse_args(["--levels", "1,2,4,8"])[0]
    ps = [bs.Prompt(str(i), f"p{i}", 2) for i in range(64)]
    got = bs.per_level(ps, [8, 1, 4, 2], s)
    assert {c: len(v) for c, v in got.items()} == {1: 8, 2: 8, 4: 16, 8: 32}
    ids = [p.id for v in got.values() for p in v]
    assert len(ids) == len(set(ids)) == 64
    with pytest.raises(ValueError, match="do not cover"):
        bs.per_level(ps[:63], [1, 2, 4, 8], s)
