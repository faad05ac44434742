"""The Foundation's promises on the real zoo model (SmolLM2-135M)."""

import math

import pytest
import torch

import edgequant as eq

pytestmark = pytest.mark.slow

TEXT = ("The lighthouse keeper climbed the stairs every evening to light the lamp, "
        "and ships far out at sea steered by its steady beam.")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return eq.load("smollm2-135m")


def test_rtn_w4g128_bits_and_reload(smollm2, tmp_path):
    q = eq.quantize(smollm2, "rtn", scheme="w4g128")
    s = q.summary()
    # fp16 scale per 128 columns; a ragged last group still stores a scale, so rows of 576
    # (= 4.5 groups) store 5 scales: 4 + 5*16/576 bits; rows of 1536 store 12: 4.125 bits.
    expected_bits = sum(o * i * 4 + o * math.ceil(i / 128) * 16 for o, i in
                        (layer["shape"] for layer in s["layers"].values()))
    assert s["bits_per_weight"] == pytest.approx(expected_bits / s["quantized_params"], abs=1e-9)
    assert s["bits_per_weight"] == pytest.approx(4.135, abs=0.001)
    assert s["num_params"] == 134_515_008
    q.save(tmp_path / "q")
    r = eq.load(tmp_path / "q")
    ids = torch.tensor([smollm2.tokenizer(TEXT)["input_ids"]])
    assert torch.equal(q.logits(ids), r.logits(ids))
    assert not torch.equal(smollm2.logits(ids), r.logits(ids))  # quantization did something
