import json

import pytest
import torch
from typer.testing import CliRunner

import edgequant as eq
from edgequant.cli import app

from ..helpers import save_hf_folder

runner = CliRunner()


@pytest.fixture
def hf_dir(tiny_llama, tmp_path):
    return save_hf_folder(tiny_llama, tmp_path / "tiny-hf")


def test_quantize_then_info_json(hf_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(hf_dir), "--scheme", "w4g32", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["bits_per_weight"] == pytest.approx(4.5)  # 4 + 16/32
    assert info["num_params"] == sum(p.numel() for p in eq.load(hf_dir).module.parameters())
    assert info["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert 4.5 < info["bits_per_weight_total"] < 16
    assert len(info["layers"]) == 14


def test_overwrite_needs_force(hf_dir, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", str(hf_dir), "-o", str(out), "-q", "--scheme", "w8"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_unknown_scheme_lists_valid_ones(hf_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(hf_dir), "-o", str(tmp_path / "q"), "--scheme",
                            "w4x"])
    assert r.exit_code == 2
    assert "w4g128" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "q").exists()


def test_override_syntax_error(hf_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(hf_dir), "-o", str(tmp_path / "q"), "--override",
                            "lm_head"])
    assert r.exit_code == 2 and "PATTERN=SCHEME" in r.output


def test_unknown_zoo_name_lists_names(tmp_path):
    r = runner.invoke(app, ["zoo", "pull", "no-such-model"])
    assert r.exit_code == 2 and "smollm2-135m" in r.output


def test_info_on_a_non_artifact(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert r.exit_code == 2


def test_help_everywhere():
    for args in (["--help"], ["quantize", "--help"], ["info", "--help"], ["zoo", "--help"],
                 ["zoo", "pull", "--help"], ["zoo", "list", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output


def test_quantized_logits_survive_the_cli(hf_dir, tmp_path):
    out = tmp_path / "q"
    assert runner.invoke(app, ["quantize", str(hf_dir), "-o", str(out), "-q"]).exit_code == 0
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    direct = eq.quantize(eq.load(hf_dir), "rtn", scheme="w4g128")
    assert torch.equal(direct.logits(ids), eq.load(out).logits(ids))
