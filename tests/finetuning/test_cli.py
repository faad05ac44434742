"""`edgequant finetune`: a run, its refusals, and `edgequant eval` reading the result."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgequant.cli import app

runner = CliRunner()
FAST = ["--seq-len", "32", "--batch-size", "2", "--compute-dtype", "float32", "--scheme",
        "w4g32", "-q"]


@pytest.fixture
def hf_dir(tiny_smol, tmp_path):
    path = tmp_path / "tiny-hf"
    tiny_smol.module.save_pretrained(path)
    tiny_smol.tokenizer.save_pretrained(path)
    return path


def test_finetune_qat_then_eval(hf_dir, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", str(hf_dir), "--method", "qat", "--max-steps", "2", "-o", str(out),
            *FAST]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["train"]["steps"] == 2 and summary["artifact"] == str(out / "model")
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["eval", str(out / "model"), "--ppl", "--ctx", "32",
                            "--max-tokens", "128", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ppl"] > 1


def test_finetune_bad_input_is_one_line(hf_dir, tmp_path):
    r = runner.invoke(app, ["finetune", str(hf_dir), "--target", "query", "--max-steps", "1",
                            "-o", str(tmp_path / "a"), *FAST])
    assert r.exit_code == 2 and "q_proj" in r.output and "Traceback" not in r.output
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    r = runner.invoke(app, ["finetune", str(hf_dir), "--data", str(bad), "--max-steps", "1",
                            "-o", str(tmp_path / "b"), *FAST])
    assert r.exit_code == 2 and "chat.jsonl:1" in r.output


def test_finetune_lora_bare_merge_and_gguf_then_eval_the_run_folder(hf_dir, tmp_path):
    out = tmp_path / "lora"
    r = runner.invoke(app, ["finetune", str(hf_dir), "--max-steps", "1", "-o", str(out),
                            "--merge", "--merge-gguf", "Q8_0", "--calib-samples", "4",
                            "--calib-len", "32", *FAST, "--json"])
    assert r.exit_code == 0, r.output
    merge = json.loads(r.stdout)["merge"]
    assert merge["recipe"]["quantizer"]["name"] == "gptq" and 0 <= merge["codes_changed"] <= 1
    assert (out / "model.gguf").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    r = runner.invoke(app, ["eval", str(out), "--ppl", "--ctx", "32", "--max-tokens", "128",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ppl"] > 1


def test_eval_of_an_unfinished_run_says_resume(hf_dir, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["finetune", str(hf_dir), "--max-steps", "1", "-o", str(out), *FAST])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "status": "interrupted"}))
    r = runner.invoke(app, ["eval", str(out), "--ppl", "--ctx", "32", "--max-tokens", "128"])
    assert r.exit_code == 2 and "same command" in r.output and "Traceback" not in r.output
