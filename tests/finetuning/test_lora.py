"""LoRA on a quantized base: exact at init, peft's format both ways, exact float merge,
re-quantization, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

import edgequant as eq
from edgequant.finetuning.lora import (
    LoraConfig,
    LoraError,
    LoraLinear,
    attach,
    codes_changed,
    load_adapter,
    merge_to_float,
    refuse_merge_into_codes,
    save_adapter,
)
from edgequant.models.model import Model
from edgequant.nn.quant_linear import QuantLinear


@pytest.fixture
def qmodel(tiny_llama):
    return eq.quantize(Model(copy.deepcopy(tiny_llama), None, {}), "rtn", "w4g32",
                       keep_dtype="float32")


def _ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _train_b(layers):
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.normal_(0, 0.2)


def test_zero_initialised_adapter_gives_exactly_the_base_logits(qmodel):
    base = qmodel.module(_ids()).logits
    layers = attach(qmodel.module, LoraConfig())
    assert len(layers) == 8 and all(isinstance(m.base, QuantLinear) for m in layers.values())
    qmodel.module.train()   # dropout on: the update is still exactly zero
    assert torch.equal(qmodel.module(_ids()).logits, base)
    trainable = {n for n, p in qmodel.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_merge_into_float_copy_is_exact(qmodel):
    module = qmodel.module
    layers = attach(module, LoraConfig(r=4, alpha=8, dropout=0.0))
    _train_b(layers)
    merged = merge_to_float(module)
    name = "model.layers.0.self_attn.q_proj"
    lora = layers[name]
    w = lora.base.dequantized_weight() + 2.0 * (lora.lora_B.weight @ lora.lora_A.weight)
    assert torch.equal(merged.get_submodule(name).weight, w)
    assert not any(isinstance(m, (QuantLinear, LoraLinear)) for m in merged.modules())
    torch.testing.assert_close(merged(_ids()).logits, module(_ids()).logits,
                               rtol=1e-5, atol=1e-5)


def test_adapter_saves_in_peft_format_and_loads_back(qmodel, tmp_path):
    module = qmodel.module
    before = copy.deepcopy(module)
    layers = attach(module, LoraConfig(r=4, alpha=8, dropout=0.0, ranks={
        "model.layers.1.self_attn.v_proj": 6}))
    _train_b(layers)
    save_adapter(module, tmp_path / "ad", LoraConfig(r=4, alpha=8), base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 6}
    keys = safetensors.torch.load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    load_adapter(before, tmp_path / "ad")
    assert torch.equal(before(_ids()).logits, module(_ids()).logits)


def test_peft_reads_our_adapter(qmodel, tmp_path):
    """peft itself, on the dequantized float model, computes what our merge computes."""
    from peft import PeftModel

    module = qmodel.module
    layers = attach(module, LoraConfig(r=4, alpha=8, dropout=0.0))
    _train_b(layers)
    save_adapter(module, tmp_path / "ad", LoraConfig(r=4, alpha=8))
    float_base = merge_to_float(_strip(module))
    peft_model = PeftModel.from_pretrained(float_base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(peft_model(_ids()).logits, module(_ids()).logits,
                               rtol=1e-5, atol=1e-5)


def _strip(module):
    from edgequant.nn.surgery import replace_module

    m = copy.deepcopy(module)
    for name, x in list(m.named_modules()):
        if isinstance(x, LoraLinear):
            replace_module(m, name, x.base)
    return m


def test_merge_and_requantize_reports_changed_codes(qmodel):
    layers = attach(qmodel.module, LoraConfig(r=4, alpha=8, dropout=0.0))
    base = _strip(qmodel.module)
    assert codes_changed(base, qmodel.module)["fraction"] == 0.0   # untrained: nothing moves
    _train_b(layers)
    merged = Model(merge_to_float(qmodel.module), None, {})
    q = eq.quantize(merged, "rtn", "w4g32", keep_dtype="float32", inplace=True)
    frac = codes_changed(base, q.module)
    assert 0.0 < frac["fraction"] < 1.0
    # a layer without adapter is re-quantized from its own dequantized weight: RTN's scale
    # can move (a group's new absmax is 7·s, not the original's up-to-7.5·s), so a few codes
    # change even there — far fewer than where the update went
    untouched = frac["layers"]["model.layers.0.mlp.up_proj"]
    assert untouched < 0.02 < frac["layers"]["model.layers.0.self_attn.q_proj"]


def test_pattern_matching_nothing_lists_the_layers(qmodel):
    with pytest.raises(LoraError, match=r"query.*down_proj, gate_proj, k_proj"):
        attach(qmodel.module, LoraConfig(targets=("query",)))


def test_a_layer_lora_cannot_wrap_is_named(qmodel):
    with pytest.raises(LoraError, match=r"model.layers.0.self_attn is a LlamaAttention"):
        attach(qmodel.module, LoraConfig(targets=("self_attn",)))


def test_merge_into_packed_codes_is_refused():
    with pytest.raises(LoraError, match="float copy and re-quantize"):
        refuse_merge_into_codes()
