"""Cells, presets, ``--methods`` items and settings."""

from __future__ import annotations

import pytest

from edgequant.comparison import plan
from edgequant.comparison.matrix import (
    Cell,
    MatrixError,
    Settings,
    build,
    cell_hash,
    item_cell,
    parse_methods,
    preset,
)
from edgequant.errors import SchemeError


def _labels(cells: list[Cell]) -> list[str]:
    return [c.label for c in cells]


def test_quick_preset_is_the_issue_list() -> None:
    cells = build((), None, "quick")
    assert {c.model for c in cells} == {"smollm2-135m"}
    assert _labels(cells) == ["baseline fp32", "rtn w4g128", "rtn w3g128", "gptq w4g128",
                              "gptq w3g128", "awq w4g128", "hqq w4g64-asym", "gguf Q4_K_M",
                              "gguf Q8_0"]
    assert [c.kind for c in cells][:1] == ["baseline"] and cells[-1].kind == "gguf"
    s = preset("quick").settings
    assert s.max_tokens <= 4096 and not s.tasks and s.calib_samples * s.calib_len <= 32 * 512


def test_paper_preset_pairs_ours_with_the_peer_tool() -> None:
    cells = build(("smollm2-135m",), None, "paper")
    tools = {(c.kind, c.label, c.tool) for c in cells}
    for ours, peer in (("awq w4g128-asym", "llmc-awq-w4a16"), ("gptq w4g128", "llmc-gptq-w4a16"),
                       ("rtn nf4", "bnb-nf4"), ("gguf Q4_K_M", "llamacpp-Q4_K_M"),
                       ("gguf Q8_0", "llamacpp-Q8_0")):
        assert any(label == ours and tool == "edgequant" for _, label, tool in tools), ours
        assert any(label == peer and kind == "peer" and tool != "edgequant"
                   for kind, label, tool in tools), peer
    assert "baseline fp32" in _labels(cells)


def test_full_preset_covers_every_method_and_bit_width() -> None:
    from edgequant.backends import peers
    from edgequant.methods import list_methods

    cells = build(("m",), None, "full")
    assert {c.method for c in cells if c.kind == "native"} == set(list_methods())
    assert {c.scheme for c in cells if c.method == "rtn"} >= {f"w{b}g128" for b in (2, 3, 4, 8)}
    assert {c.method for c in cells if c.kind == "peer"} == set(peers.names())


def test_two_models_each_get_their_baseline() -> None:
    cells = build(("gemma3-270m", "smollm2-135m"), ("gptq:w4g128",))
    assert [(c.model, c.label) for c in cells] == [
        ("gemma3-270m", "baseline fp32"), ("gemma3-270m", "gptq w4g128"),
        ("smollm2-135m", "baseline fp32"), ("smollm2-135m", "gptq w4g128")]


def test_methods_items() -> None:
    assert parse_methods("gptq:w4g128, gguf:q4_k_m,,bnb-nf4") == ("gptq:w4g128", "gguf:q4_k_m",
                                                                  "bnb-nf4")
    assert parse_methods(["rtn:w4g128,awq:w4g128", "baseline"]) == ("rtn:w4g128", "awq:w4g128",
                                                                     "baseline")
    assert item_cell("m", "gguf:q4_k_m").scheme == "Q4_K_M"
    assert item_cell("m", "sq:w8a8").method == "smoothquant"  # aliases resolve
    assert item_cell("m", "rtn:W4G128").scheme == "w4g128"
    peer = item_cell("m", "bnb-nf4")
    assert peer.kind == "peer" and peer.tool == "bitsandbytes"
    for bad, match in (("nope:w4g128", "unknown --methods item"), ("rtn:w9", "2–8 bits"),
                       ("rtn:x4", "unknown scheme"), ("gguf:Q9_X", "unknown GGUF file type"),
                       ("bnb-nf5", "unknown")):
        with pytest.raises(Exception, match=match):
            item_cell("m", bad)
    with pytest.raises(MatrixError, match="empty"):
        parse_methods(" , ")
    with pytest.raises(MatrixError, match="unknown preset"):
        preset("huge")


def test_plan_settings_and_limit() -> None:
    cells, s = plan(("smollm2-135m",), "quick", "rtn:w4g128", limit=20)
    assert _labels(cells) == ["baseline fp32", "rtn w4g128"]
    assert s.limit == 20 and s.tasks == ("arc_easy", "hellaswag")
    _, s = plan((), "quick", None, tasks="piqa", limit=5, max_tokens=None)
    assert s.tasks == ("piqa",) and s.max_tokens == preset("quick").settings.max_tokens
    with pytest.raises(MatrixError, match="unknown compare setting"):
        plan((), "quick", None, context=5)
    with pytest.raises(MatrixError, match="at least one window"):
        Settings(ctx=512, max_tokens=100)


def test_hash_covers_what_changes_a_result() -> None:
    rtn, gptq = item_cell("m", "rtn:w4g128"), item_cell("m", "gptq:w4g128")
    s = Settings()
    more_calib = Settings(calib_samples=64)
    assert cell_hash(rtn, s, "fp") == cell_hash(rtn, more_calib, "fp")  # rtn uses no data
    assert cell_hash(gptq, s, "fp") != cell_hash(gptq, more_calib, "fp")
    assert cell_hash(rtn, s, "fp") != cell_hash(rtn, Settings(max_tokens=8192), "fp")
    assert cell_hash(rtn, s, "fp") != cell_hash(rtn, s, "other weights")
    assert cell_hash(rtn, s, "fp") != cell_hash(item_cell("m", "rtn:w4g64"), s, "fp")
    assert Cell.from_dict(gptq.to_dict()) == gptq
    assert Settings.from_dict(Settings(tasks=("piqa",)).to_dict()) == Settings(tasks=("piqa",))


def test_method_items_take_options_as_quantize_set_does() -> None:
    cell = item_cell("m", "gptq:w4g64:act_order=true:damp=0.02")
    assert cell.options == (("act_order", True), ("damp", 0.02))
    assert cell.label == "gptq w4g64 act_order=true damp=0.02"
    plain = item_cell("m", "gptq:w4g64")
    assert cell_hash(cell, Settings(), "f") != cell_hash(plain, Settings(), "f")
    with pytest.raises(SchemeError, match="KEY=VALUE"):
        item_cell("m", "gptq:w4g64:act_order")
    labels = set(_labels(build(("smollm2-135m",), None, "paper")))
    assert {"awq w4g64-asym duo_scaling=true",
            "gptq w4g64 act_order=true static_groups=true"} <= labels
