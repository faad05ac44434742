"""The real makers and evaluator on a tiny model (an HF folder written here): baseline, our
RTN and AWQ artifacts, our GGUF export — made, read back for per-layer errors, evaluated by
``eq.evaluate`` (speed and memory in a fresh process), stored and reported. Plus the
per-layer error functions against known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgequant.comparison import matrix
from edgequant.comparison.layer_error import fit_scales, layer_key, relative_error
from edgequant.comparison.matrix import Settings
from edgequant.comparison.runner import run
from edgequant.comparison.store import Store
from tests.exporters.tiny import TEXT, tiny


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-src")
    model = tiny("llama", hidden=256, n_layer=2)
    model.module.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT * 12))
    return root / "model", corpus


def test_layer_key_and_errors() -> None:
    assert layer_key("model.layers.3.mlp.up_proj") == (3, "up_proj")
    assert layer_key("blk.12.attn_output.weight") == (12, "o_proj")
    assert layer_key("lm_head") == (None, "lm_head")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48))
    noise = rng.normal(size=w.shape) * 0.01
    assert relative_error(w, w + noise) == pytest.approx(
        np.linalg.norm(noise) / np.linalg.norm(w))
    # a folded per-channel rescaling is not an error once fitted; without fitting it is
    r, c = rng.uniform(0.5, 2, 64), rng.uniform(0.5, 2, 48)
    scaled = r[:, None] * w * c
    assert relative_error(w, scaled, rescaled=True) < 1e-8
    assert relative_error(w, scaled) > 0.3
    assert np.allclose(fit_scales(w, scaled), scaled)
    noisy = scaled + noise
    assert relative_error(w, noisy, rescaled=True) == pytest.approx(
        np.linalg.norm(noise) / np.linalg.norm(scaled), rel=0.05)


def test_gguf_errors_read_back_from_the_file(tmp_path: Path) -> None:
    from edgequant.comparison.layer_error import gguf_errors
    from edgequant.exporters.gguf import export

    model = tiny("llama", hidden=256, n_layer=2)
    errs = {}
    for ftype in ("Q8_0", "Q4_0"):
        path = export(model, tmp_path / f"m-{ftype}.gguf", ftype, tokenizer_pre="gpt-2")
        errs[ftype] = gguf_errors(model, path, "gpt-2")
    assert len(errs["Q8_0"]) == 2 * 7  # 7 linears per block
    assert {e["role"] for e in errs["Q8_0"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"}
    assert errs["Q8_0"][0]["layer"].startswith("model.layers.0.")
    q8 = np.mean([e["rel_error"] for e in errs["Q8_0"]])
    q4 = np.mean([e["rel_error"] for e in errs["Q4_0"]])
    assert 0 < q8 < 0.01 < q4 < 0.2


def test_real_cells_end_to_end(tiny_source: tuple[Path, Path], tmp_path: Path) -> None:
    from edgequant.report import render_report
    from edgequant.report.tables import parse_markdown_table

    src, corpus = tiny_source
    m = str(src)
    cells = [matrix.baseline(m), matrix.native(m, "rtn", "w4g64"),
             matrix.native(m, "awq", "w4g64"), matrix.gguf(m, "Q8_0", tokenizer_pre="gpt-2")]
    settings = Settings(corpus=str(corpus), ctx=64, max_tokens=256, prompt_tokens=16,
                        new_tokens=4, speed_runs=1, warmup=0, generate_prompts=1,
                        generate_tokens=4, calib_corpus=str(corpus), calib_samples=4,
                        calib_len=32)
    summary = run(cells, tmp_path / "out", settings)
    with Store(tmp_path / "out") as s:
        errors = [(e.label, e.message, e.traceback[-600:]) for e in s.open_errors()]
        assert not summary.failed, errors
        rows = {r.label: r for r in s.results()}
        base, rtn, awq, q8 = (rows["baseline fp32"], rows["rtn w4g64"], rows["awq w4g64"],
                              rows["gguf Q8_0"])
        assert base.m("kld_mean") == pytest.approx(0.0, abs=1e-9)
        assert base.m("top1") == 1.0
        assert 0 < q8.m("kld_mean") < rtn.m("kld_mean")
        assert awq.m("kld_mean") > 0 and awq.m("ppl") > 0
        assert rtn.m("bits_per_weight") == pytest.approx(4 + 16 / 64)
        assert q8.m("bits_per_weight") == pytest.approx(8.5)
        for r in rows.values():
            assert r.m("tokens_scored") == 4 * 63
            assert r.m("bytes_scored") == base.m("bytes_scored") > 0
            assert r.m("peak_rss_mb") > 0 and r.m("decode_tps") > 0 and r.m("size_bytes") > 0
            assert len(s.generations(r.result_id)) == 1
        # per-layer errors: every linear of our artifacts, none for the baseline
        for label in ("rtn w4g64", "awq w4g64", "gguf Q8_0"):
            errs = s.result_layer_errors(rows[label].result_id)
            assert len(errs) == 14 and all(0 < e["rel_error"] < 0.3 for e in errs), label
        assert s.result_layer_errors(base.result_id) == []
        ev = json.loads(s.db.execute("SELECT eval FROM results WHERE id=?",
                                     (rtn.result_id,)).fetchone()[0])
        assert ev["corpus"] == str(corpus) and ev["kld_base"]["path"]
    assert (tmp_path / "out" / "artifacts").is_dir()
    table = parse_markdown_table(render_report(tmp_path / "out").read_text())
    assert len(table) == 4
    # re-running finds every cell done
    again = run(cells, tmp_path / "out", settings)
    assert len(again.skipped) == 4 and not again.done
    torch.set_num_threads(torch.get_num_threads())  # no global change leaks from the runner
