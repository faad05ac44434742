"""Importance matrices: the sums, llama.cpp's two file formats, and exports weighted by them
that equal llama.cpp's own ``--imatrix`` quantization byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from edgequant.data.calibration import Calibration
from edgequant.errors import GGUFError
from edgequant.exporters.gguf import llama_cpp_quantize, plan_export
from edgequant.exporters.imatrix import collect
from edgequant.gguf.imatrix import ImportanceMatrix
from edgequant.gguf.reader import inspect_gguf

from .test_gguf import _export, _tensor_bytes
from .tiny import TEXT, tiny

QT = GGMLQuantizationType


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def tokens(llama) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(llama.tokenizer), (6, 32), generator=g)


@pytest.fixture(scope="module")
def imatrix(llama, tokens) -> ImportanceMatrix:
    return collect(llama, Calibration(tokens, compute_dtype="float32"))


def test_sums_are_column_energy_of_each_linears_input(llama, tokens, imatrix) -> None:
    block = llama.module.model.layers[1]
    seen: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    hooks = [block.self_attn.q_proj.register_forward_hook(
                 lambda m, a, o: seen["q"].append(a[0].reshape(-1, a[0].shape[-1]))),
             block.mlp.down_proj.register_forward_hook(
                 lambda m, a, o: seen["down"].append(a[0].reshape(-1, a[0].shape[-1])))]
    with torch.no_grad():
        llama.module(tokens)
    for h in hooks:
        h.remove()
    for role, name in (("q", "blk.1.attn_q.weight"), ("down", "blk.1.ffn_down.weight")):
        x = torch.cat(seen[role]).double()
        np.testing.assert_allclose(imatrix.sums[name], (x * x).sum(0).float().numpy(), rtol=1e-5)
        assert imatrix.counts[name] == tokens.numel()
    # q, k and v read the same input, so llama.cpp stores the same entry three times
    np.testing.assert_array_equal(imatrix.sums["blk.0.attn_q.weight"],
                                  imatrix.sums["blk.0.attn_v.weight"])
    assert len(imatrix) == 2 * 7 and "output.weight" not in imatrix  # blocks only, by default
    assert (imatrix.chunk_count, imatrix.chunk_size) == (6, 32)
    w = imatrix.weights("blk.1.ffn_down.weight")
    np.testing.assert_allclose(w, imatrix.sums["blk.1.ffn_down.weight"] / tokens.numel())


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_file_round_trip(imatrix, suffix: str, tmp_path) -> None:
    path = imatrix.save(tmp_path / f"m{suffix}")
    back = ImportanceMatrix.load(path)
    assert set(back.sums) == set(imatrix.sums)
    for name in imatrix.sums:
        np.testing.assert_allclose(back.weights(name), imatrix.weights(name), rtol=1e-6)
    assert back.chunk_count == imatrix.chunk_count
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{suffix}"]


def test_gguf_layout_is_llama_cpps(imatrix, tmp_path) -> None:
    """``imatrix.cpp``'s save_imatrix: <name>.in_sum2 (F32, 1×n) and <name>.counts (F32, 1×1)."""
    info = inspect_gguf(imatrix.save(tmp_path / "m.gguf"))
    assert info.kv["general.type"] == "imatrix" and "general.architecture" not in info.kv
    assert info.kv["imatrix.chunk_count"] == 6 and info.kv["imatrix.chunk_size"] == 32
    assert info.kv["imatrix.datasets"] == ["tokens"]
    t = info.tensor("blk.0.attn_q.weight.in_sum2")
    c = info.tensor("blk.0.attn_q.weight.counts")
    assert (t.type, t.shape, c.type, c.shape) == (QT.F32, (1, 256), QT.F32, (1, 1))


def test_legacy_dat_layout(imatrix, tmp_path) -> None:
    """``save_imatrix_legacy``: values are Σx²/count · ncall, ncall = ceil(count / chunk)."""
    import struct

    data = imatrix.save(tmp_path / "m.dat").read_bytes()
    (n,) = struct.unpack_from("<i", data, 0)
    (length,) = struct.unpack_from("<i", data, 4)
    name = data[8:8 + length].decode()
    ncall, nval = struct.unpack_from("<ii", data, 8 + length)
    vals = np.frombuffer(data, "<f4", nval, 16 + length)
    assert n == len(imatrix) and name == sorted(imatrix.sums)[0] and ncall == 6
    np.testing.assert_allclose(vals, imatrix.weights(name) * 6, rtol=1e-6)


def test_bad_imatrix_files(tmp_path) -> None:
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\x7f")
    with pytest.raises(GGUFError, match="imatrix"):
        ImportanceMatrix.load(tmp_path / "junk.dat")
    with pytest.raises(GGUFError, match="does not exist"):
        ImportanceMatrix.load(tmp_path / "missing.gguf")


def test_imatrix_for_another_model_is_refused(imatrix) -> None:
    other = tiny("llama", hidden=64)
    with pytest.raises(GGUFError, match="another model|no entry"):
        plan = plan_export(other, "Q4_K_M", imatrix=imatrix, tokenizer_pre="gpt-2")
        plan.encode(1)


def test_imatrix_changes_k_quant_codes_and_is_recorded(llama, imatrix, tmp_path) -> None:
    plain = _tensor_bytes(_export(llama, tmp_path / "a.gguf", "Q4_K_M"))
    path = _export(llama, tmp_path / "b.gguf", "Q4_K_M", imatrix=imatrix)
    weighted = _tensor_bytes(path)
    assert plain["blk.0.attn_q.weight"] != weighted["blk.0.attn_q.weight"]
    assert plain["token_embd.weight"] == weighted["token_embd.weight"]  # no entry: unweighted
    kv = inspect_gguf(path).kv
    assert kv["quantize.imatrix.entries_count"] == len(imatrix)
    assert kv["quantize.imatrix.chunks_count"] == 6


def test_export_with_calibration_data(llama, tokens, tmp_path) -> None:
    calib = Calibration(tokens, compute_dtype="float32")
    a = _export(llama, tmp_path / "a.gguf", "Q4_K_S", calib=calib)
    b = _export(llama, tmp_path / "b.gguf", "Q4_K_S", imatrix=collect(llama, tokens))
    assert _tensor_bytes(a) == _tensor_bytes(b)
    with pytest.raises(GGUFError, match="not both"):
        _export(llama, tmp_path / "c.gguf", "Q4_K_S", calib=tokens, imatrix=tmp_path / "x")


@pytest.mark.llama
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "Q3_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q5_1"])
def test_weighted_export_equals_llama_cpp_with_the_same_imatrix(llama, imatrix, ftype: str,
                                                                tmp_path) -> None:
    f32 = _export(llama, tmp_path / "f32.gguf", "F32")
    file = imatrix.save(tmp_path / "im.gguf")
    ours = _export(llama, tmp_path / "ours.gguf", ftype, imatrix=file)
    ref = llama_cpp_quantize(f32, tmp_path / "ref.gguf", ftype, imatrix=file, threads=1)
    a, b = _tensor_bytes(ours), _tensor_bytes(ref)
    assert [n for n in a if a[n] != b[n]] == []


def test_cli_imatrix_then_export(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgequant.cli import app

    gemma = tiny("gemma3", hidden=64)
    gemma.module.save_pretrained(tmp_path / "g")
    gemma.tokenizer.save_pretrained(tmp_path / "g")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 30))
    runner = CliRunner()
    res = runner.invoke(app, ["imatrix", str(tmp_path / "g"), "-o", str(tmp_path / "im.dat"),
                              "--calib", str(corpus), "--calib-samples", "4", "--calib-len",
                              "32", "--quiet"])
    assert res.exit_code == 0, res.output
    im = ImportanceMatrix.load(tmp_path / "im.dat")
    assert "blk.1.ffn_down.weight" in im
    res = runner.invoke(app, ["export", str(tmp_path / "g"), "-o", str(tmp_path / "g.gguf"),
                              "--imatrix", str(tmp_path / "im.dat"), "--type", "Q4_K_M",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert inspect_gguf(tmp_path / "g.gguf").kv["quantize.imatrix.entries_count"] == len(im)


# --- GPTQ error feedback -------------------------------------------------------------------------


def test_gptq_lowers_the_output_error_of_32_blocks(llama, tokens) -> None:
    """tr(E H Eᵀ), the change of the layer outputs on the calibration inputs, for Q4_0."""
    from edgequant.gguf import quants

    calib = Calibration(tokens, compute_dtype="float32")
    plain = plan_export(llama, "Q4_0", calib=calib, tokenizer_pre="gpt-2")
    gptq = plan_export(llama, "Q4_0", calib=calib, tokenizer_pre="gpt-2", gptq=True)
    H = gptq.imatrix.hessians
    assert H is not None and np.shares_memory(H["blk.0.attn_k.weight"], H["blk.0.attn_q.weight"])
    errors = {"imatrix": 0.0, "gptq": 0.0}
    for i, t in enumerate(plain.conv.tensors):
        if t.name not in H:
            continue
        W = t.load().astype(np.float64)
        for key, plan in (("imatrix", plain), ("gptq", gptq)):
            E = W - quants.dequantize(plan.encode(i), plan.types[t.name]).reshape(W.shape)
            errors[key] += float(np.einsum("ij,jk,ik->", E, H[t.name], E))
    assert errors["gptq"] < 0.75 * errors["imatrix"], errors


@pytest.mark.llama
def test_gptq_export_runs_in_llama_cpp(llama, tokens, tmp_path) -> None:
    import edgequant as eq

    calib = Calibration(tokens, compute_dtype="float32")
    path = _export(llama, tmp_path / "g.gguf", "Q4_0", calib=calib, gptq=True)
    ids = tokens[0].tolist()
    with torch.no_grad():
        ref = llama.module(torch.tensor([ids])).logits[0]
    with eq.open(str(path)) as r:
        got = r.logits(ids)
    assert float((got - ref).abs().max()) < 0.25 * float(ref.abs().max())


def test_gptq_needs_calibration_data(llama, imatrix, tokens) -> None:
    with pytest.raises(GGUFError, match="gptq needs calibration data"):
        plan_export(llama, "Q4_0", imatrix=imatrix, gptq=True, tokenizer_pre="gpt-2")
    with_h = collect(llama, tokens, hessians=True)  # an in-memory matrix with its Hessians
    assert plan_export(llama, "Q4_0", imatrix=with_h, gptq=True, tokenizer_pre="gpt-2").gptq
