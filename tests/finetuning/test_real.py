"""A real SmolLM2-135M run of a few steps: QAT with distillation lowers the KD loss of the
batch it trains on, the artifact reloads with the same logits, and `edgequant eval` reads the
run folder; a LoRA run merged by the default (GPTQ with calibration) reloads as well. (That
training lowers KLD on *held-out* text is the benchmark's job: bench_finetune.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import edgequant as eq
from edgequant.cli import app
from edgequant.data.tokens import corpus_tokens
from edgequant.finetuning.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from edgequant.finetuning.objectives import Distillation

pytestmark = pytest.mark.slow

SEQ = 128
RUN = dict(max_steps=6, seq_len=SEQ, batch_size=4, warmup_steps=0, save_every=0)


@pytest.fixture(scope="module")
def teacher(smollm2_dir):
    return eq.load(smollm2_dir)


@pytest.fixture
def rtn(teacher):
    return eq.quantize(teacher, "rtn", "w4g128")


@pytest.fixture(scope="module")
def text_file(teacher, tmp_path_factory):
    """A text file of two windows from wiki's *first* half (the evaluation half): trained on
    whole, so every step sees the same batch and its KD loss must go down."""
    ids = corpus_tokens("wiki", teacher.tokenizer)[1:2 * SEQ + 40]   # 2 windows, not 3
    path = tmp_path_factory.mktemp("text") / "two-windows.txt"
    path.write_text(teacher.tokenizer.decode(ids))
    return path


@torch.no_grad()
def _kd(model, teacher, batch) -> float:
    return float(Distillation(teacher.module)(model.module.eval(), batch)[0])


def test_qat_lowers_kd_reloads_and_evaluates(rtn, teacher, text_file, tmp_path):
    from edgequant.finetuning.data import DataConfig, build_data

    batch = build_data(DataConfig(str(text_file), seq_len=SEQ, batch_size=2),
                       teacher.tokenizer).batch(0)
    before = _kd(rtn, teacher, batch)
    out = tmp_path / "qat"
    r = eq.finetune(rtn, "qat", str(text_file), out, teacher=teacher, **RUN)
    assert r.summary["data_stats"]["windows"] == 2      # the same batch at every step
    after = _kd(r.model, teacher, batch)
    assert after < 0.9 * before, (before, after)
    back = eq.load(out)                                    # the run folder → OUT/model
    ids = batch["input_ids"][:1, :32]
    assert torch.equal(back.logits(ids), r.model.logits(ids))
    res = CliRunner().invoke(app, ["eval", str(out), "--ppl", "--ctx", str(SEQ),
                                   "--max-tokens", "256", "--json", "-q"])
    assert res.exit_code == 0, res.output
    ppl = json.loads(res.stdout)["ppl"]
    assert 1 < ppl < 1000


def test_lora_merged_by_default_gptq_reloads(rtn, teacher, tmp_path):
    out = tmp_path / "lora"
    r = eq.finetune(rtn, "lora", "wiki", out, teacher=teacher, merge="default",
                    calib_samples=8, calib_len=SEQ, **{**RUN, "max_steps": 2})
    assert (out / "adapter" / ADAPTER_CONFIG).is_file()
    assert (out / "adapter" / ADAPTER_WEIGHTS).is_file()
    cfg = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    merge = r.summary["merge"]
    assert merge["recipe"]["quantizer"]["name"] == "gptq" and 0 < merge["codes_changed"] < 1
    back = eq.load(out)
    assert back.recipe.quantizer_name == "gptq" and back.recipe.scheme == "w4g128"
