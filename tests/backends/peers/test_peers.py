"""Peer tools behind one interface: make -> open -> the same Runnable code, on tiny models.

Each peer that runs on CPU is made from the same tiny model and must give logits that are
finite, close to the original (a tolerance per bit width), and different from it; bits per
weight counted from its stored tensors must be what its format costs; a fresh process must
reproduce its logits exactly from the artifact alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgequant.backends import peers
from edgequant.backends.base import open_runnable
from edgequant.errors import EdgequantError

from .conftest import CALIB, IDS, tiny_peer_module

# name -> (relative logits error: min, max; bits per weight: min, max). The errors are those of
# a random tiny model (weights ~ N(0, 0.02)); the minimum says quantization happened at all.
CPU_PEERS: dict[str, tuple[float, float, float, float]] = {
    "bnb-nf4": (0.05, 0.35, 4.5, 4.5),
    "bnb-nf4-dq": (0.05, 0.35, 4.12, 4.13),
    "bnb-fp4": (0.05, 0.45, 4.5, 4.5),
    "bnb-int8": (0.002, 0.06, 8.06, 8.13),
    "hqq-w4g64": (0.05, 0.35, 4.5, 4.5),
    "hqq-w3g64": (0.1, 0.6, 3.7, 3.72),
    "quanto-int8": (0.002, 0.06, 8.06, 8.13),
    "quanto-int4": (0.05, 0.4, 4.5, 4.5),
    "quanto-fp8": (0.005, 0.12, 8.06, 8.13),
    "quanto-w8a8": (0.002, 0.1, 8.06, 8.13),
    "torchao-int8wo": (0.002, 0.06, 8.06, 8.14),
    "torchao-int8da": (0.002, 0.06, 8.06, 8.14),
    "torchao-int4wo-g32": (0.05, 0.35, 9.25, 9.25),
    "llmc-gptq-w4a16": (0.05, 0.4, 4.25, 4.3),
    "llmc-gptq-w4a16-g64": (0.05, 0.4, 4.5, 4.55),
    "llmc-awq-w4a16": (0.05, 0.4, 4.25, 4.3),
    "llmc-rtn-w4a16-g64": (0.05, 0.4, 4.5, 4.55),
    "llmc-w8a8": (0.002, 0.08, 8.06, 8.13),
    "gptqmodel-w4g128": (0.05, 0.4, 4.1, 4.4),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the registry ---------------------------------------------------------------------------


def test_registry_names_and_adapters():
    names = peers.names()
    assert len(names) == len(set(names)) > 30
    for n in names:
        m = peers.get(n)
        assert m.name == n and m.tool and m.scheme_label
        assert m.calibrated or not n.endswith("-imat")
        adapter = m._adapter()  # our module imports without importing the tool
        assert callable(adapter.make) and callable(adapter.open)
    assert set(CPU_PEERS) <= set(names)
    assert set(peers.available()) <= set(names)
    with pytest.raises(peers.PeerError, match="unknown peer method"):
        peers.get("bnb-nf5")
    with pytest.raises(peers.PeerError, match="no option"):
        peers.get("bnb-nf4").make("unused", "unused", block=32)


def test_methods_are_frozen_and_hashable():
    m = peers.get("hqq-w4g64")
    with pytest.raises(AttributeError):
        m.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.options["nbits"] = 3  # type: ignore[index]
    assert hash(m) == hash(peers.get("hqq-w4g64"))


# --- a missing library ------------------------------------------------------------------------


def test_missing_library_is_a_clear_error(monkeypatch, peer_tiny_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "hqq", None)  # `import hqq` now raises ImportError
    assert not any(n.startswith("hqq-") for n in peers.available())
    assert peers.tools()["hqq"] is None
    with pytest.raises(peers.PeerUnavailableError) as e:
        peers.get("hqq-w4g64").make(peer_tiny_dir, tmp_path / "out")
    assert isinstance(e.value, EdgequantError)
    assert "pip install edgequant[peers]" in str(e.value) and "hqq" in str(e.value)
    assert not (tmp_path / "out").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / peers.MARKER).write_text(json.dumps({"format": "edgequant-peer", "method":
                                                 "hqq-w4g64", "tool": "hqq"}))
    with pytest.raises(peers.PeerUnavailableError, match=r"edgequant\[peers\]"):
        open_runnable(str(fake), backend="peer")


# --- make -> open, per peer ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CPU_PEERS))
def test_make_open_logits_and_size(name, made, reference_logits):
    lo, hi, bpw_lo, bpw_hi = CPU_PEERS[name]
    path = made(name)
    record = json.loads((path / peers.MARKER).read_text())
    assert record["method"] == name and record["tool_version"] and record["make_s"] >= 0
    assert record["source"]["num_params"] > 0 and record["files"]
    if peers.get(name).calibrated:
        assert record["calibration"]["n"] == CALIB.shape[0]
    with open_runnable(str(path), backend="peer") as r:
        logits = r.logits(IDS)
        assert logits.shape == reference_logits.shape and torch.isfinite(logits).all()
        rel = _rel(logits, reference_logits)
        assert lo < rel < hi, f"{name}: relative logits error {rel:.4f} not in ({lo}, {hi})"
        size = r.size_info()
        assert bpw_lo <= size["bits_per_weight"] <= bpw_hi, size
        assert size["num_params"] == record["source"]["num_params"]
        assert size["size_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert size["quantized_layers"] == 14  # 2 blocks × (q, k, v, o, gate, up, down)
        ident = r.identity()
        assert ident["peer"] == name and ident["weights_sha256"] and ident["quantized"]
        assert r.reopen_spec(path) == str(path)
        batch = r.logits_batch([IDS[:10], IDS])
        assert torch.allclose(batch[1], logits, atol=1e-4, rtol=1e-4)
        assert len(r.generate(IDS[:8], max_tokens=4, ignore_eos=True).token_ids) == 4


_CHILD = """
import json, sys, torch
import edgequant.backends.peers  # registers the `peer` backend
from edgequant.backends.base import open_runnable
ids = json.loads(sys.argv[1])
out = {}
for path in sys.argv[3:]:
    with open_runnable(path, backend="peer") as r:
        out[path] = r.logits(ids)
torch.save(out, sys.argv[2])
"""


def test_fresh_process_reopens_identically(made, tmp_path):
    """Every artifact, opened in a fresh process (no source model there), gives the same
    logits bit for bit as opening it here."""
    paths = [str(made(n)) for n in CPU_PEERS]
    dump = tmp_path / "logits.pt"
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(IDS), str(dump), *paths],
                         capture_output=True, text=True, timeout=1200, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = torch.load(dump)
    for name, path in zip(CPU_PEERS, paths, strict=True):
        with open_runnable(path, backend="peer") as r:
            assert torch.equal(r.logits(IDS), theirs[path]), name


def test_quantizers_differ_from_each_other(made):
    """Activation quantization is kept through save/load: int8 dynamic activations differ from
    int8 weight-only of the same weights."""
    with open_runnable(str(made("torchao-int8wo")), backend="peer") as a, \
            open_runnable(str(made("torchao-int8da")), backend="peer") as b:
        assert not torch.equal(a.logits(IDS), b.logits(IDS))


def test_open_runnable_recognises_a_peer_folder_by_default(made):
    code = ("import sys; from edgequant.backends.base import open_runnable; "
            "r = open_runnable(sys.argv[1]); print(r.backend); r.close()")
    res = subprocess.run([sys.executable, "-c", code, str(made("bnb-nf4"))],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("peer"), res.stderr[-500:]


def test_make_from_a_model_in_memory(peer_tiny_dir, tmp_path, reference_logits):
    """A loaded ``Model`` is written to a temporary folder for the tool; a quantized one is
    refused (peers quantize original weights)."""
    import edgequant as eq
    from edgequant.errors import ModelLoadError

    model = eq.load(peer_tiny_dir)
    path = peers.get("bnb-nf4").make(model, tmp_path / "from-model")
    record = json.loads((path / peers.MARKER).read_text())
    assert record["source"]["name"] == model.name
    assert record["source"]["num_params"] == sum(p.numel() for p in model.module.parameters())
    with peers.get("bnb-nf4").open(path) as r:
        assert 0.05 < _rel(r.logits(IDS), reference_logits) < 0.35
    with pytest.raises(ModelLoadError, match="original weights"):
        peers.get("bnb-nf4").make(eq.quantize(model, "rtn", scheme="w8"), tmp_path / "q")
    with pytest.raises(ModelLoadError, match="made by bnb-nf4"):
        peers.get("bnb-fp4").open(path)


# --- bit-exactness with our own formats -------------------------------------------------------


@pytest.mark.parametrize("name,scheme", [("bnb-nf4", "nf4"), ("bnb-nf4-dq", "nf4-dq")])
def test_bnb_nf4_is_bit_exact_with_ours(name, scheme, made, peer_tiny_dir):
    import edgequant as eq
    from edgequant.backends.peers.bnb import dequantized_weights
    from edgequant.nn.quant_linear import QuantLinear

    with open_runnable(str(made(name)), backend="peer") as r:
        theirs = dequantized_weights(r)
        bits = r.size_info()["bits_per_weight"]
    ours = eq.quantize(eq.load(peer_tiny_dir), "rtn", scheme=scheme)
    mine = {n: m.dequantized_weight() for n, m in ours.module.named_modules()
            if isinstance(m, QuantLinear)}
    assert set(theirs) == set(mine) and len(mine) == 14
    for n in mine:
        assert torch.equal(theirs[n], mine[n]), n
    assert ours.summary()["bits_per_weight"] == pytest.approx(bits, abs=1e-9)


# --- tool errors ------------------------------------------------------------------------------


def test_llmcompressor_refusal_is_the_tools_error(tmp_path):
    """Linear widths that are not multiples of 128 (like SmolLM2's 576): llm-compressor
    refuses group 128; the refusal surfaces as a PeerError quoting the tool, and no
    artifact is left behind."""
    from ...helpers import save_hf_folder

    src = save_hf_folder(tiny_peer_module(hidden=192), tmp_path / "w192")
    with pytest.raises(peers.PeerError, match="llmcompressor") as e:
        peers.get("llmc-gptq-w4a16").make(src, tmp_path / "out", calib=CALIB)
    assert "divisible" in str(e.value) or "group" in str(e.value)
    assert not (tmp_path / "out").exists()


# --- llama.cpp's quantizer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny Llama (256-wide, so no K-quant fallbacks) with SmolLM2's real BPE tokenizer:
    llama.cpp's converters need a tokenizer llama.cpp can run."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("peer-bpe") / "tiny-bpe"
    tiny_peer_module(vocab=49152).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(out)
    return out


@pytest.mark.llama
def test_llamacpp_q8_0_and_q4_k_m(bpe_tiny_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    with open_runnable(str(bpe_tiny_dir), backend="torch") as ref:
        base = ref.logits(IDS)
    expected = {"Q8_0": (0.002, 0.06, 8.5, 8.5), "Q4_K_M": (0.03, 0.35, 4.5, 5.5)}
    for ftype, (lo, hi, bpw_lo, bpw_hi) in expected.items():
        path = peers.get(f"llamacpp-{ftype}").make(bpe_tiny_dir, tmp_path / ftype)
        record = json.loads((path / peers.MARKER).read_text())
        assert [p.name for p in path.glob("*.gguf")] == [record["gguf"]]  # F32 removed
        with open_runnable(str(path), backend="peer") as r:
            assert r.backend == "llama.cpp"
            rel = _rel(r.logits(IDS), base)
            assert lo < rel < hi, (ftype, rel)
            size = r.size_info()
            assert bpw_lo <= size["bits_per_weight"] <= bpw_hi, size
            assert r.identity()["peer"] == f"llamacpp-{ftype}"
            assert r.reopen_spec(tmp_path).endswith(".gguf")


@pytest.mark.llama
def test_llamacpp_imatrix_changes_the_codes(bpe_tiny_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    plain = peers.get("llamacpp-Q4_0").make(bpe_tiny_dir, tmp_path / "plain")
    calib = torch.randint(100, 49000, (8, 64), generator=torch.Generator().manual_seed(2))
    imat = peers.get("llamacpp-Q4_0-imat").make(bpe_tiny_dir, tmp_path / "imat", calib=calib)
    record = json.loads((imat / peers.MARKER).read_text())
    assert record["config"]["imatrix_entries"] == 14
    a = (plain / "model-Q4_0.gguf").read_bytes()
    b = (imat / "model-Q4_0.gguf").read_bytes()
    assert len(a) == len(b) and a != b


def test_llamacpp_failure_quotes_the_tool(peer_tiny_dir, tmp_path):
    """A word-level tokenizer cannot become a GGUF: the converter's message is raised."""
    pytest.importorskip("llama_cpp")
    with pytest.raises(EdgequantError, match="(?i)tokenizer"):
        peers.get("llamacpp-Q8_0").make(peer_tiny_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_speed_subprocess_reopens_a_peer_with_the_evaluators_options(made):
    """The evaluator reopens a model for speed/memory with ``reopen_options``: a peer takes
    them (its tool picks its own dtype; edgequant's ``speed_dtype`` is for native models)."""
    from edgequant.eval.memory import measure_fresh

    with open_runnable(str(made("bnb-nf4")), backend="peer") as r:
        options = r.reopen_options()
    assert "dtype" not in options
    res = measure_fresh(str(made("bnb-nf4")), "peer", IDS[:8], new_tokens=2, runs=1, warmup=0,
                        options=options)
    assert res["decode_tps"] > 0
