"""The ``edgequant`` command run as a user runs it: a fresh process, its real stdout and stderr.

What a user sees is checked here: stdout holds the results alone (``--json`` parses), stderr
holds no library chatter, ``--help`` and ``info`` import neither torch nor transformers (what
makes them start in well under a second), and a bad argument fails before any model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgequant as eq
from edgequant.cli import _QUIET_ENV

from ..helpers import save_hf_folder

SRC = Path(eq.__file__).resolve().parents[1]
#: lines that libraries print at start or while loading, which the CLI must not show
NOISE = ("Failed to load", "_pytree", "Loading weights", "Warning", "WARNING", "it/s]",
         "Traceback")


def edgequant(*args: str, importtime: bool = False, env_extra: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edgequant.cli ARGS`` with this checkout first on the path (and none of
    the quieting variables set, unless ``env_extra`` sets them as a user would)."""
    env = {k: v for k, v in os.environ.items() if k not in _QUIET_ENV}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "edgequant.cli",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          check=False)


def imported(res: subprocess.CompletedProcess[str]) -> set[str]:
    """Top-level packages a ``-X importtime`` run imported."""
    names = set()
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def assert_quiet(stderr: str, allow: tuple[str, ...] = ()) -> None:
    """No line of ``stderr`` is library noise (but those containing an ``allow`` string)."""
    noisy = [line for line in stderr.splitlines() if any(n in line for n in NOISE)
             and not any(a in line for a in allow)]
    assert not noisy, noisy


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                         max_position_embeddings=256, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("cli-process")
    src = save_hf_folder(LlamaForCausalLM(config).eval(), root / "tiny")
    return eq.quantize(src, "rtn", scheme="w4g32", overrides=(("lm_head", "w8"),)
                       ).save(root / "q")


def test_help_imports_no_torch_and_prints_nothing_else() -> None:
    res = edgequant("--help")
    assert res.returncode == 0 and "Usage" in res.stdout
    assert res.stderr == ""
    mods = imported(edgequant("--help", importtime=True))
    assert "edgequant" in mods and "typer" in mods
    assert not mods & {"torch", "transformers", "torchao", "numpy"}, mods


def test_info_reads_the_artifact_without_torch(artifact: Path) -> None:
    res = edgequant("info", str(artifact), "--json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    info = json.loads(res.stdout)
    summary = eq.load(artifact).summary()
    for key in ("layers", "num_params", "quantized_layers", "quantized_params",
                "quantized_bytes", "weight_bytes", "bits_per_weight", "bits_per_weight_total"):
        assert info[key] == summary[key], key
    assert info["size_bytes"] == (artifact / "model.safetensors").stat().st_size
    assert info["layers"]["lm_head"]["scheme"] == "w8"
    table = edgequant("info", str(artifact))
    assert table.returncode == 0 and table.stderr == ""
    assert "model.layers.1.mlp.down_proj" in table.stdout and "bits/weight" in table.stdout
    mods = imported(edgequant("info", str(artifact), importtime=True))
    assert not mods & {"torch", "transformers", "torchao"}, mods


def test_zoo_list_shows_every_model() -> None:
    from edgequant.models import zoo

    res = edgequant("zoo", "list")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    for name in zoo.ZOO:
        assert name in res.stdout
    rows = json.loads(edgequant("zoo", "list", "--json").stdout)
    assert [r["name"] for r in rows] == list(zoo.ZOO)
    assert {type(r["cached"]) for r in rows} == {bool}
    assert all("SmolLM2-135M-Instruct" in r["description"] for r in rows[:2])


@pytest.mark.parametrize(("args", "named", "listed"), [
    (["--method", "foo"], "'foo'", "rtn"),
    (["--scheme", "w4x"], "'w4x'", "w4g128"),
    (["--method", "gptq", "--set", "no_such_option=1"], "no_such_option", "gptq"),
    (["--recipe", "gptq+awq"], "'gptq+awq'", "transforms first"),
    (["--recipe", "awq+gptq", "--set", "n_grid=many"], "'many'", "n_grid"),
    (["--recipe", "rtn", "--scheme", "Q4_K"], "Q4_K", "export"),
])
def test_bad_quantize_arguments_fail_before_the_model_loads(
        artifact: Path, tmp_path: Path, args: list[str], named: str, listed: str) -> None:
    out = tmp_path / "never"
    res = edgequant("quantize", str(artifact.parent / "tiny"), "-o", str(out), *args,
                    importtime=True)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error:"), errors
    assert named in errors[0] and listed in errors[0]
    assert "loading" not in res.stderr and "transformers" not in imported(res)
    assert not out.exists()


def test_quantize_prints_only_our_own_lines(artifact: Path, tmp_path: Path) -> None:
    res = edgequant("quantize", str(artifact.parent / "tiny"), "-o", str(tmp_path / "q"),
                    "--scheme", "w8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["bits_per_weight"] > 8
    assert_quiet(res.stderr)
    assert [line.split()[0] for line in res.stderr.splitlines()] == ["loading"]


def test_methods_lists_every_step_with_its_options() -> None:
    from edgequant.methods import list_methods

    res = edgequant("methods", "--json")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    # (this process may also hold steps that test modules registered)
    assert set(rows) == {m for m in list_methods() if not m.startswith("test_")}
    assert rows["awq"]["kind"] == "transform" and rows["gptq"]["kind"] == "quantizer"
    assert rows["gptq"]["options"]["act_order"] is False and rows["gptq"]["needs"] == ["hessian"]


def test_info_shows_the_kernel_each_layer_would_run_on(artifact: Path) -> None:
    from edgequant.kernels import registered_kernels

    names = {k.name for k in registered_kernels()}
    ref = edgequant("info", str(artifact), "--kernels", "reference", "--dtype", "float32",
                    "--json")
    assert ref.returncode == 0, ref.stderr
    layers = json.loads(ref.stdout)["kernels"]["layers"]
    assert layers and {v["kernel"] for v in layers.values()} == {"reference"}
    auto = edgequant("info", str(artifact), "--kernels", "auto", "--json")
    assert auto.returncode == 0, auto.stderr
    assert {v["kernel"] for v in json.loads(auto.stdout)["kernels"]["layers"].values()} <= names
    bad = edgequant("info", str(artifact), "--kernels", "nope")
    assert bad.returncode == 2 and "reference" in bad.stderr
