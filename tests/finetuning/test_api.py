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
