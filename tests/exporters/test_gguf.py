"""GGUF export: file types and mixtures, byte-identity with llama.cpp's own quantizer, quantized
artifacts, atomic writes, and clear errors for bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

import edgequant as eq
from edgequant.errors import (
    EdgequantError,
    GGUFError,
    OutputExistsError,
    UnsupportedArchitectureError,
)
from edgequant.exporters.gguf import ExportPlan, export, llama_cpp_quantize, plan_export
from edgequant.gguf.mixtures import FILE_TYPES
from edgequant.gguf.reader import inspect_gguf

from .tiny import text_ids, tiny

QT = GGMLQuantizationType


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def _export(model, path: Path, ftype: str, **kw) -> Path:
    pre = None if model.module.config.model_type.startswith("gemma") else "gpt-2"
    return export(model, path, ftype, tokenizer_pre=pre, **kw)


def _tensor_bytes(path: Path) -> dict[str, tuple[QT, bytes]]:
    info = inspect_gguf(path)
    out = {}
    with open(path, "rb") as f:
        for t in info.tensors:
            f.seek(info.data_offset + t.offset)
            out[t.name] = (t.type, f.read(t.nbytes))
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- file types ------------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q2_K"])
def test_file_type_and_per_tensor_types(llama, ftype: str, tmp_path) -> None:
    path = _export(llama, tmp_path / "m.gguf", ftype)
    info = inspect_gguf(path)
    plan = plan_export(llama, ftype, tokenizer_pre="gpt-2")
    assert info.kv["general.file_type"] == FILE_TYPES[ftype]
    assert info.kv["general.quantization_version"] == 2
    assert {t.name: t.type for t in info.tensors} == plan.types
    assert info.tensor("blk.0.attn_norm.weight").type == QT.F32  # norms stay float32
    assert info.file_size > 0 and _leftovers(tmp_path) == ["m.gguf"]


def test_rows_that_256_does_not_divide_fall_back_like_llama_cpp() -> None:
    model = tiny("llama", hidden=192)  # like SmolLM2's 576: K-quants do not fit the rows
    types = plan_export(model, "Q4_K_M", tokenizer_pre="gpt-2").types
    assert types["blk.0.attn_q.weight"] == QT.Q5_0  # q4_K -> q5_0
    assert types["blk.0.ffn_down.weight"] == QT.Q5_0  # 384 columns: q4_K -> q5_0
    assert types["blk.1.ffn_down.weight"] == QT.Q8_0  # last layer gets q6_K -> q8_0
    assert types["output.weight"] == QT.Q8_0  # q6_K -> q8_0 for the output


def test_file_type_names_are_case_insensitive_and_checked(llama, tmp_path) -> None:
    assert plan_export(llama, "q4_k_m", tokenizer_pre="gpt-2").ftype == "Q4_K_M"
    with pytest.raises(GGUFError, match="unknown GGUF file type 'Q7_K'"):
        _export(llama, tmp_path / "m.gguf", "Q7_K")
    assert _leftovers(tmp_path) == []


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("ftype", ["F16", "Q8_0", "Q6_K", "Q5_K_S", "Q4_K_M", "Q4_0", "Q3_K_M",
                                   "Q2_K"])
def test_bytes_equal_llama_cpps_own_quantizer(arch: str, ftype: str, tmp_path) -> None:
    """Our file type X == llama_model_quantize(our F32 file, X), tensor for tensor."""
    model = tiny(arch)
    f32 = _export(model, tmp_path / "f32.gguf", "F32")
    ours = _export(model, tmp_path / "ours.gguf", ftype)
    ref = llama_cpp_quantize(f32, tmp_path / "ref.gguf", ftype, threads=1)
    a, b = _tensor_bytes(ours), _tensor_bytes(ref)
    assert a.keys() == b.keys()
    bad = [n for n in a if a[n] != b[n]]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# --- quantized artifacts ---------------------------------------------------------------------


@pytest.mark.llama
def test_quantized_model_is_dequantized_and_reencoded(llama, tmp_path) -> None:
    q = eq.quantize(llama, "rtn", scheme="w4g64")
    artifact = q.save(tmp_path / "artifact")  # from the native artifact folder, by path
    path = export(str(artifact), tmp_path / "q.gguf", "Q8_0", tokenizer_pre="gpt-2")
    ids = text_ids(q, 32)
    with torch.no_grad():
        ref = q.module(torch.tensor([ids])).logits[0]
    with eq.open(str(path)) as r:
        got = r.logits(ids)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


# --- atomic writes and bad input --------------------------------------------------------------


def test_existing_output_needs_force(llama, tmp_path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        _export(llama, out, "Q8_0")
    assert out.read_bytes() == b"old"
    _export(llama, out, "Q8_0", force=True)
    assert inspect_gguf(out).kv["general.file_type"] == FILE_TYPES["Q8_0"]


def test_failure_mid_write_leaves_nothing_behind(llama, tmp_path, monkeypatch) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    real = ExportPlan.encode

    def encode(self: ExportPlan, i: int) -> np.ndarray:
        if i == 5:
            raise GGUFError("disk on fire")
        return real(self, i)

    monkeypatch.setattr(ExportPlan, "encode", encode)
    with pytest.raises(GGUFError, match="disk on fire"):
        _export(llama, out, "Q4_K_M", force=True)
    assert out.read_bytes() == b"old"  # the old file is untouched
    assert _leftovers(tmp_path) == ["m.gguf"]  # and no temporary file is left


def test_unsupported_architecture_is_refused_before_writing(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from .tiny import bpe_tokenizer

    tok = bpe_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok)))
    model = eq.Model(gpt2.eval(), tok, {"name": "tiny-gpt2"})
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        export(model, tmp_path / "g.gguf", "F16")
    assert _leftovers(tmp_path) == []


# --- damaged GGUF files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(llama, tmp_path_factory) -> Path:
    return _export(llama, tmp_path_factory.mktemp("good") / "good.gguf", "Q8_0")


def _type_field_offset(path: Path) -> int:
    """Byte offset of the GGML type of the first tensor-table entry."""
    from gguf import GGUFReader

    field = GGUFReader(path).tensors[0].field
    return int(field.offset) + sum(int(p.nbytes) for p in field.parts[:-2])


def test_truncated_file(good_file, tmp_path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good_file.read_bytes()[: good_file.stat().st_size - 1000])
    with pytest.raises(GGUFError, match="truncated"):
        inspect_gguf(bad)
    bad.write_bytes(good_file.read_bytes()[:5000])  # inside the metadata
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        inspect_gguf(bad)


def test_not_a_gguf_file(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        inspect_gguf(bad)


def test_unknown_tensor_type(good_file, tmp_path) -> None:
    data = bytearray(good_file.read_bytes())
    at = _type_field_offset(good_file)
    assert struct.unpack_from("<I", data, at)[0] == int(QT.Q8_0) or \
        struct.unpack_from("<I", data, at)[0] == int(QT.F32)
    struct.pack_into("<I", data, at, 77)
    bad = tmp_path / "t.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown tensor type 77"):
        inspect_gguf(bad)


def test_exporting_from_a_damaged_gguf_writes_nothing(good_file, tmp_path) -> None:
    src = tmp_path / "src" / "cut.gguf"
    src.parent.mkdir()
    src.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgequantError):
        eq.export(str(src), out / "m.gguf", "Q4_K_M")
    assert _leftovers(out) == []


# --- CLI -------------------------------------------------------------------------------------


def test_cli_export(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgequant.cli import app

    gemma, llama_ = tiny("gemma3", hidden=64), tiny("llama", hidden=64)
    for name, m in (("gemma", gemma), ("llama", llama_)):
        m.module.save_pretrained(tmp_path / name)
        m.tokenizer.save_pretrained(tmp_path / name)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "gemma"), "-o", str(tmp_path / "g.gguf"),
                              "--type", "Q8_0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert inspect_gguf(tmp_path / "g.gguf").arch == "gemma3"
    # an unknown BPE pre-tokenizer: a one-line error, status 2, no file
    res = runner.invoke(app, ["export", str(tmp_path / "llama"), "-o", str(tmp_path / "l.gguf"),
                              "--quiet"])
    assert res.exit_code == 2 and "pre-tokenizer" in res.output
    assert not (tmp_path / "l.gguf").exists()
    res = runner.invoke(app, ["export", str(tmp_path / "gemma"), "-o", str(tmp_path / "x.gguf"),
                              "--type", "Q9", "--quiet"])
    assert res.exit_code == 2 and "unknown GGUF file type" in res.output


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.llama
def test_smollm2_q4_k_m(smollm2_dir, tmp_path) -> None:
    """Our Q4_K_M == llama.cpp's Q4_K_M of our F32 file (bytes, and so perplexity); it runs."""
    model = eq.load(smollm2_dir)
    f32 = eq.export(model, tmp_path / "f32.gguf", "F32")
    ours = eq.export(model, tmp_path / "q4km.gguf", "Q4_K_M")
    ref = llama_cpp_quantize(f32, tmp_path / "ref.gguf", "Q4_K_M")
    a, b = _tensor_bytes(ours), _tensor_bytes(ref)
    assert [n for n in a if a[n] != b[n]] == []
    opts = dict(corpus="wiki", ctx=512, max_tokens=4096)
    ppl_ours = eq.evaluate(str(ours), ["ppl"], **opts).ppl
    ppl_ref = eq.evaluate(str(ref), ["ppl"], **opts).ppl
    assert abs(ppl_ours / ppl_ref - 1) < 0.01
    with eq.open(str(ours)) as r:
        out = r.chat([{"role": "user", "content": "What is the capital of France?"}],
                     max_tokens=16)
        assert out.completion_tokens > 0 and out.text.strip()


@pytest.mark.slow
def test_shipped_smollm2_gguf_round_trips_byte_for_byte(tmp_path) -> None:
    """The zoo's original Q4_1 file -> eq.load (dequantized) -> export Q4_1: every tensor
    equals the original's (its linears sit on the Q4_1 grid, its embedding on Q8_0's)."""
    from edgequant.models import zoo

    original = zoo.fetch_gguf("smollm2-135m")
    ours = eq.export(str(original), tmp_path / "again.gguf", "Q4_1")
    a, b = _tensor_bytes(original), _tensor_bytes(ours)
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []


# --- recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("ftype", [f for f in FILE_TYPES])
@pytest.mark.parametrize("has_imatrix", [False, True])
def test_mixture_recipe_gives_llama_cpps_types(arch: str, ftype: str, has_imatrix: bool) -> None:
    """A llama.cpp file type as a recipe: the same type for every tensor as choose_types."""
    from edgequant.exporters.convert import convert
    from edgequant.exporters.gguf import mixture_recipe, recipe_types
    from edgequant.gguf.mixtures import TensorInfo, choose_types
    from edgequant.recipe import Recipe

    model = tiny(arch, hidden=192)
    conv = convert(model, pre=None if arch == "gemma3" else "gpt-2")
    want = choose_types([TensorInfo(t.name, t.shape) for t in conv.tensors], ftype,
                        conv.n_layer, arch=conv.arch, n_gqa=conv.n_gqa, has_imatrix=has_imatrix)
    recipe = mixture_recipe(conv, ftype, has_imatrix)
    assert recipe_types(conv, recipe) == want
    assert recipe_types(conv, Recipe.from_dict(recipe.to_dict())) == want


def test_custom_recipe_of_ggml_types(llama, tmp_path) -> None:
    """Per-layer GGML types from patterns; unnamed layers outside the blocks are kept in
    keep_dtype; the recipe is in the file's metadata and reads back equal."""
    import json

    from edgequant.recipe import Recipe

    recipe = Recipe(scheme="Q4_0", formats={"*.mlp.down_proj": "Q8_0", "lm_head": "q6_k",
                                            "model.layers.1.*": "Q5_1"})
    path = export(llama, tmp_path / "c.gguf", recipe, tokenizer_pre="gpt-2")
    info = inspect_gguf(path)
    types = {t.name: t.type for t in info.tensors}
    assert types["blk.0.attn_q.weight"] == QT.Q4_0
    assert types["blk.0.ffn_down.weight"] == QT.Q8_0
    assert types["blk.1.ffn_down.weight"] == QT.Q5_1          # later patterns win
    assert types["output.weight"] == QT.Q6_K
    assert types["token_embd.weight"] == QT.F16               # kept: keep_dtype float16
    assert types["blk.0.attn_norm.weight"] == QT.F32
    assert "general.file_type" not in info.kv
    assert Recipe.from_dict(json.loads(info.kv["edgequant.recipe"])) == recipe


def test_named_file_type_records_its_recipe(llama, tmp_path) -> None:
    import json

    from edgequant.recipe import Recipe

    info = inspect_gguf(_export(llama, tmp_path / "m.gguf", "Q4_K_M"))
    r = Recipe.from_dict(json.loads(info.kv["edgequant.recipe"]))
    assert r.scheme == "Q4_K" and r.quantizer_name == "rtn"


def test_recipes_the_exporter_cannot_write_are_refused(llama, tmp_path) -> None:
    from edgequant.recipe import Recipe

    with pytest.raises(GGUFError, match="native scheme"):
        export(llama, tmp_path / "a.gguf", Recipe(scheme="w4g32"), tokenizer_pre="gpt-2")
    with pytest.raises(GGUFError, match="no transforms"):
        export(llama, tmp_path / "b.gguf", Recipe.parse("awq", "Q4_0"), tokenizer_pre="gpt-2")
    with pytest.raises(GGUFError, match="rtn .* or gptq, not hqq"):
        export(llama, tmp_path / "c.gguf", Recipe.parse("hqq", "Q4_0"), tokenizer_pre="gpt-2")
    assert _leftovers(tmp_path) == []


def test_an_override_that_names_no_tensor_is_refused(tmp_path) -> None:
    """Tied embeddings: there is no lm_head tensor, so 'lm_head=Q8_0' would change nothing."""
    model = tiny("gemma3")
    with pytest.raises(GGUFError, match="'lm_head' matches no tensor"):
        export(model, tmp_path / "t.gguf", "Q4_0", overrides=(("lm_head", "Q8_0"),))
    path = export(model, tmp_path / "e.gguf", "Q4_0",
                  overrides=(("model.embed_tokens", "Q8_0"),))
    assert inspect_gguf(path).tensor("token_embd.weight").type == QT.Q8_0
    assert _leftovers(tmp_path) == ["e.gguf"]
