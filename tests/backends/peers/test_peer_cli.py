"""``edgequant eval PEER_ARTIFACT --json`` in a fresh process: stdout is the JSON alone.

llmcompressor adds a loguru sink on ``sys.stdout`` when it is imported and logs a warning on
every CPU run (``get_main_device | WARNING - No accelerator available!``); that line once came
before the JSON and broke ``json.loads``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ...cli.test_cli_process import assert_quiet, edgequant

#: compressed-tensors' own progress bars (tqdm with an explicit ``disable=``)
BARS = ("Applying quantization config", "Dispatching model")


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{i % 100 + 4}" for i in range(600)))
    return path


@pytest.mark.parametrize("log_level", [None, "WARNING"])
def test_eval_json_of_an_llmcompressor_artifact_parses(made, text: Path,
                                                       log_level: str | None) -> None:
    """Quiet by default; with llmcompressor's warnings turned on by the user, they go to
    stderr."""
    art = made("llmc-rtn-w4a16-g64")
    env = {"LLM_COMPRESSOR_LOG_LEVEL": log_level} if log_level else None
    res = edgequant("eval", str(art), "--json", "--ppl", "--corpus", str(text), "--ctx", "64",
                    "--max-tokens", "256", env_extra=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"]["peer"] == "llmc-rtn-w4a16-g64" and out["ppl"] > 1
    if log_level:
        assert "No accelerator available" in res.stderr
    else:
        assert_quiet(res.stderr, allow=BARS)
