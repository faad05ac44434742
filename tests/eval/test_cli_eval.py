import json

import pytest
from typer.testing import CliRunner

from edgequant.cli import app

from ._tiny import tiny_model

runner = CliRunner()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    model.module.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("Words and more words for the tiny model to read. " * 20)
    return tmp_path / "m", corpus


def test_eval_json_prints_one_object(setup):
    model, corpus = setup
    r = runner.invoke(app, ["eval", str(model), "--ppl", "--size", "--corpus", str(corpus),
                            "--ctx", "64", "--kld-base", str(model), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["metrics"] == ["ppl", "kld", "size"] and d["ppl"] > 1
    assert abs(d["kld_mean"]) < 1e-6 and d["top1"] == 1.0 and d["num_params"] > 0
    r = runner.invoke(app, ["eval", str(model), "--ppl", "--corpus", str(corpus), "--ctx", "64"])
    assert r.exit_code == 0 and "ppl" in r.stdout


def test_eval_errors_are_one_line_exit_2(setup):
    model, corpus = setup
    r = runner.invoke(app, ["eval", str(model), "--tasks", "nope", "--json"])
    assert r.exit_code == 2 and "unknown task" in r.output
    r = runner.invoke(app, ["eval", str(model), "--ppl", "--corpus", str(corpus) + ".missing"])
    assert r.exit_code == 2 and "nor an existing text file" in r.output
    assert "Traceback" not in r.output
