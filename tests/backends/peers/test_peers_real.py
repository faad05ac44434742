"""Peers on the zoo's real model (slow): bitsandbytes NF4 with double quantization must land
where ENVIRONMENT.md measured it (KLD 0.264 against the fp32 model)."""

from __future__ import annotations

import pytest

ENV_NF4_DQ_KLD = 0.264


@pytest.mark.slow
def test_bnb_nf4_dq_kld_on_smollm2(smollm2_dir, tmp_path):
    import edgequant as eq
    from edgequant.backends import peers

    path = peers.get("bnb-nf4-dq").make(smollm2_dir, tmp_path / "nf4dq")
    with peers.open_peer(str(path)) as r, eq.open(str(smollm2_dir)) as base:
        size = r.size_info()
        res = eq.evaluate(r, ["kld"], kld_base=base, max_tokens=4096)  # 8 windows of 512
    assert size["bits_per_weight"] == pytest.approx(4.127, abs=0.001)
    assert res.kld_mean == pytest.approx(ENV_NF4_DQ_KLD, rel=0.2), res.kld_mean
