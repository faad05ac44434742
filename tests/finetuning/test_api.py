"""eq.finetune end to end on a tiny model: every method trains, saves and reloads."""

from __future__ import annotations

import json

import pytest
import torch

import edgequant as eq
from edgequant.errors import OutputExistsError
from edgequant.finetuning.api import load_finetuned
from edgequant.finetuning.lora import LoraLinear
from edgequant.finetuning.prilora import depth_ranks, prune_mask
from edgequant.nn.quant_linear import QuantLinear

FAST = dict(seq_len=32, batch_size=2, save_every=0, compute_dtype="float32", lr=1e-3,
            warmup_steps=1)


def _ids():
    return torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))


def test_qat_run_writes_an_artifact_that_reloads(tiny_smol, tmp_path):
    r = eq.finetune(tiny_smol, "qat", "wiki", tmp_path / "qat", max_steps=3,
                    scheme="w4g32", **FAST)
    cfg = json.loads((tmp_path / "qat" / "config.json").read_text())
    assert cfg["status"] == "complete" and cfg["config"]["objective"] == "kd"
    assert cfg["train"]["steps"] == 3 and (tmp_path / "qat" / "loss.png").is_file()
    assert "second half" in cfg["data"]["held_out"]
    back = eq.load(tmp_path / "qat" / "model")
    assert torch.equal(back.module(_ids()).logits, r.model.module(_ids()).logits)
    assert {m.scheme.name for m in back.module.modules() if isinstance(m, QuantLinear)} == \
        {"w4g32"}
    with pytest.raises(OutputExistsError, match="finished"):
        eq.finetune(tiny_smol, "qat", "wiki", tmp_path / "qat", max_steps=3, scheme="w4g32",
                    **FAST)


def test_lora_run_with_merge_and_requantize(tiny_smol, tmp_path):
    r = eq.finetune(tiny_smol, "lora", "wiki", tmp_path / "lora", max_tokens=200,
                    scheme="w4g32", merge="rtn", **FAST)
    assert r.summary["train"]["steps"] == 4        # ceil(200 / (2 · 32))
    assert 0 <= r.summary["merge"]["codes_changed"] < 0.5
    tuned = load_finetuned(tmp_path / "lora")      # the merged, re-quantized artifact
    assert any(isinstance(m, QuantLinear) for m in tuned.module.modules())
    base = eq.load(tmp_path / "lora" / "base")
    from edgequant.finetuning.lora import load_adapter
    load_adapter(base.module, tmp_path / "lora" / "adapter")
    assert torch.equal(base.module(_ids()).logits, r.model.module(_ids()).logits)


def test_resume_through_the_api(tiny_smol, tmp_path):
    import copy

    ref = eq.finetune(copy.deepcopy(tiny_smol), "lora", "wiki", tmp_path / "ref", max_steps=4,
                      scheme="w4g32", **{**FAST, "save_every": 2})

    def crash(rec):
        if rec.step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        eq.finetune(copy.deepcopy(tiny_smol), "lora", "wiki", tmp_path / "run", max_steps=4,
                    scheme="w4g32", on_step=crash, **{**FAST, "save_every": 2})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == \
        "interrupted"
    again = eq.finetune(copy.deepcopy(tiny_smol), "lora", "wiki", tmp_path / "run",
                        max_steps=4, scheme="w4g32", **{**FAST, "save_every": 2})
    assert [h.loss for h in again.history] == [h.loss for h in ref.history]


def test_prilora_ranks_grow_with_depth_and_pruning_follows_importance(tiny_smol, tmp_path):
    r = eq.finetune(tiny_smol, "prilora", "wiki", tmp_path / "p", max_steps=2, scheme="w4g32",
                    prune_every=1, prune_ratio=0.5, **FAST)
    layers = {n: m for n, m in r.model.module.named_modules() if isinstance(m, LoraLinear)}
    assert {n: m.r for n, m in layers.items() if n.endswith("q_proj")} == {
        "model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 12}
    a = layers["model.layers.1.self_attn.q_proj"].lora_A.weight
    assert ((a == 0).sum(1) >= a.shape[1] // 2).all()       # half of each row pruned
    t = r.summary["trainable"]
    assert t["params"] == t["plain_lora_same_avg_rank"]      # 4 and 12 average to 8


def test_depth_ranks_and_prune_mask_by_hand():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(5)]
    assert list(depth_ranks(names).values()) == [4, 6, 8, 10, 12]
    a = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    norm = torch.tensor([4.0, 1.0, 0.1, 2.0])                # scores 4, 2, 0.3, 1
    assert prune_mask(a, norm, 0.5).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("method", ["lr-qat", "qlora"])
def test_other_methods_train_and_save(tiny_smol, tmp_path, method):
    r = eq.finetune(tiny_smol, method, "wiki", tmp_path / method, max_steps=2, scheme="w4g32",
                    **FAST)
    back = load_finetuned(tmp_path / method)
    assert torch.equal(back.module(_ids()).logits, r.model.module(_ids()).logits)
    if method == "qlora":
        assert {m.scheme.name for m in back.module.modules() if isinstance(m, QuantLinear)} \
            == {"nf4-dq"}


CALIB = dict(calib_samples=4, calib_len=32)


def test_merge_default_is_gptq_with_calibration_under_the_base_scheme(tiny_smol, tmp_path):
    out = tmp_path / "m"
    r = eq.finetune(tiny_smol, "lora", "wiki", out, max_steps=2, scheme="w4g32",
                    merge="default", **CALIB, **FAST)
    cfg = json.loads((out / "config.json").read_text())
    merge = cfg["merge"]
    assert cfg["config"]["merge"] == "gptq" and merge["recipe"]["quantizer"]["name"] == "gptq"
    assert merge["calibration"]["n"] == 4 and merge["calibration"]["seq_len"] == 32
    assert "second half" in merge["calibration"]["source"]
    assert 0 < merge["codes_changed"] < 1 and merge["seconds"] > 0
    merged = eq.load(out)                      # the run folder: its merged artifact
    assert merged.recipe.quantizer_name == "gptq"
    assert {m.scheme.name for m in merged.module.modules() if isinstance(m, QuantLinear)} \
        == {"w4g32"}
    assert not any(isinstance(m, LoraLinear) for m in merged.module.modules())
    assert torch.equal(merged.module(_ids()).logits, eq.load(out / "model").module(_ids()).logits)
    assert r.summary["merge"]["artifact"] == str(out / "model")


def test_merge_to_gguf_reads_back_with_its_types(tiny_smol, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    out = tmp_path / "g"
    r = eq.finetune(tiny_smol, "lora", "wiki", out, max_steps=1, scheme="w4g32",
                    merge_gguf="q8_0", **CALIB, **FAST)
    g = r.summary["merge"]["gguf"]
    assert g["file_type"] == "Q8_0" and g["encoder"] == "gptq"
    assert not (out / "model").exists()        # only the GGUF was asked for
    types = {t.name: t.tensor_type for t in GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))


def test_eq_load_of_a_lora_run_is_base_plus_adapter(tiny_smol, tmp_path):
    r = eq.finetune(tiny_smol, "lora", "wiki", tmp_path / "l", max_steps=2, scheme="w4g32",
                    lr=1e-2, **{k: v for k, v in FAST.items() if k != "lr"})
    back = eq.load(tmp_path / "l")
    assert any(isinstance(m, LoraLinear) for m in back.module.modules())
    r.model.module.eval()
    assert torch.equal(back.module(_ids()).logits, r.model.module(_ids()).logits)
    bf = eq.load(tmp_path / "l", torch.bfloat16)    # the adapter follows the float dtype
    assert bf.module(_ids()).logits.dtype == torch.bfloat16


def test_eq_load_of_an_unfinished_run_says_resume(tiny_smol, tmp_path):
    from edgequant.finetuning.loop import TrainingError

    def crash(rec):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        eq.finetune(tiny_smol, "lora", "wiki", tmp_path / "k", max_steps=3, scheme="w4g32",
                    on_step=crash, **FAST)
    with pytest.raises(TrainingError, match="resume it with the same command"):
        eq.load(tmp_path / "k")


@pytest.mark.parametrize(("method", "options", "match"), [
    ("qat", {"merge": "default"}, "LoRA methods"),
    ("lora", {"merge": "awq", "merge_gguf": "Q4_K_M"}, "gptq or rtn"),
    ("lora", {"merge_gguf": "Q9_X"}, "unknown GGUF file type"),
])
def test_merge_options_refused_up_front(tiny_smol, tmp_path, method, options, match):
    with pytest.raises(eq.EdgequantError, match=match):
        eq.finetune(tiny_smol, method, "wiki", tmp_path / "x", max_steps=1, **options, **FAST)
    assert not (tmp_path / "x").exists()
