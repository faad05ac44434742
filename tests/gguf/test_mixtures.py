"""llama.cpp's per-tensor type choice, checked against ``llama_model_quantize`` itself."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from edgequant.errors import GGUFError
from edgequant.gguf import mixtures, quants
from edgequant.gguf.mixtures import FILE_TYPES, TensorInfo, choose_types

QT = GGMLQuantizationType


# --- tiny Llama-architecture models -------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    hidden: int
    n_layer: int
    n_head: int
    n_kv: int
    n_ff: int
    tied: bool
    vocab: int = 256

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_kv

    def tensors(self) -> list[TensorInfo]:
        kv = self.n_kv * (self.hidden // self.n_head)
        h, f = self.hidden, self.n_ff
        out = [
            TensorInfo("token_embd.weight", (self.vocab, h)),
            TensorInfo("output_norm.weight", (h,)),
        ]
        if not self.tied:
            out.append(TensorInfo("output.weight", (self.vocab, h)))
        for i in range(self.n_layer):
            p = f"blk.{i}."
            out += [
                TensorInfo(p + "attn_norm.weight", (h,)),
                TensorInfo(p + "attn_q.weight", (h, h)),
                TensorInfo(p + "attn_k.weight", (kv, h)),
                TensorInfo(p + "attn_v.weight", (kv, h)),
                TensorInfo(p + "attn_output.weight", (h, h)),
                TensorInfo(p + "ffn_norm.weight", (h,)),
                TensorInfo(p + "ffn_gate.weight", (f, h)),
                TensorInfo(p + "ffn_up.weight", (f, h)),
                TensorInfo(p + "ffn_down.weight", (h, f)),
            ]
        return out


SPECS = {
    # 16 layers so that n/16, n/8 and the every-third-layer pattern all show; GQA 4; untied
    "h256": Spec(hidden=256, n_layer=16, n_head=8, n_kv=2, n_ff=256, tied=False),
    # no GQA, tied embeddings, ffn_down rows of 96: the K-types fall back to 32-blocks
    "h256-tied": Spec(hidden=256, n_layer=8, n_head=4, n_kv=4, n_ff=96, tied=True),
    # SmolLM2-like rows of 576 (no K-type fits), ffn_down rows of 80: not even 32 fits -> F16
    "h576": Spec(hidden=576, n_layer=8, n_head=9, n_kv=3, n_ff=80, tied=True),
}


def write_f32_gguf(path: Path, spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """A random F32 Llama GGUF with the metadata llama-quant needs (no vocab required)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(FILE_TYPES["F32"])
    data = {}
    for t in spec.tensors():
        data[t.name] = (rng.standard_t(5, t.shape) * 0.02).astype(np.float32)
        w.add_tensor(t.name, data[t.name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


def llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[ftype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {ftype}"


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("mixtures")
    models = {}
    for key, spec in SPECS.items():
        path = root / f"{key}-f32.gguf"
        models[key] = (path, write_f32_gguf(path, spec))
    return models


# --- agreement with llama.cpp -------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_choose_types_matches_llama_quantize(ftype, f32_models, tmp_path):
    """The point of the module: every tensor's type equals what llama.cpp writes."""
    for key, spec in SPECS.items():
        src, _ = f32_models[key]
        dst = tmp_path / f"{key}-{ftype}.gguf"
        llama_quantize(src, dst, ftype)
        got = {t.name: QT(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}
        ours = choose_types(spec.tensors(), ftype, spec.n_layer, n_gqa=spec.n_gqa)
        diff = {n: (ours.get(n), got[n]) for n in got if ours.get(n) != got[n]}
        assert not diff, f"{key} {ftype}: ours vs llama.cpp {diff}"
        assert set(ours) == set(got)


@pytest.mark.llama
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"])
def test_encoded_file_matches_llama_quantize(ftype, f32_models, tmp_path):
    """End to end: our types *and* our bytes equal llama.cpp's file, tensor by tensor.

    This also pins which encoder path ``llama_model_quantize`` takes without an imatrix: ours
    without an imatrix is ggml's ``quantize_row_*_ref``.
    """
    spec = SPECS["h256-tied"]
    src, data = f32_models["h256-tied"]
    dst = tmp_path / f"{ftype}.gguf"
    llama_quantize(src, dst, ftype)
    ours = choose_types(spec.tensors(), ftype, spec.n_layer, n_gqa=spec.n_gqa)
    seen = set()
    for t in gguf.GGUFReader(dst).tensors:
        if t.name.startswith("blk.") and not t.name.startswith(("blk.0.", "blk.2.")):
            continue  # layer 0 gets the extra bits, layer 2 does not; enough to see every type
        x = data[t.name]
        ref = np.asarray(t.data).view(np.uint8).reshape(-1)
        enc = quants.quantize(x.reshape(-1, x.shape[-1]), ours[t.name]).reshape(-1)
        assert np.array_equal(enc, ref), f"{t.name} ({ours[t.name].name}) bytes differ"
        seen.add(ours[t.name])
    assert len(seen) >= 3, seen  # F32 norms plus at least two quantized types


# --- the rules on their own ---------------------------------------------------------------------


def test_file_types_are_llama_cpp_enum_values():
    for name, value in FILE_TYPES.items():
        member = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
        assert gguf.LlamaFileType[member] == value


def test_q4_k_m_uses_more_bits_on_the_llama_cpp_pattern():
    spec = SPECS["h256"]  # 16 layers: layers 0-1, 14-15 and 4, 7, 10, 13
    types = choose_types(spec.tensors(), "Q4_K_M", spec.n_layer, n_gqa=spec.n_gqa)
    six = [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == QT.Q6_K]
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(16)] == [
        QT.Q6_K if i in six else QT.Q4_K for i in range(16)
    ]
    assert types["output.weight"] == QT.Q6_K and types["token_embd.weight"] == QT.Q4_K
    assert types["blk.3.attn_norm.weight"] == QT.F32


def test_counters_follow_llama_cpps_walk_order():
    # blk.10 sorts after blk.9 (by layer), not after blk.1 (by name): i_attention_wv < 2 in
    # Q3_K_M must mean layers 0 and 1 even when the list comes shuffled
    names = [f"blk.{i}.attn_v.weight" for i in (10, 1, 0, 2, 11, 9)]
    tensors = [TensorInfo(n, (256, 256)) for n in names] + [TensorInfo("output.weight", (8, 256))]
    types = choose_types(tensors, "Q3_K_M", n_layer=12)
    assert {n for n in names if types[n] == QT.Q5_K} == {
        "blk.0.attn_v.weight",
        "blk.1.attn_v.weight",
    }


def test_tied_embeddings_are_typed_like_the_output():
    tied = [TensorInfo("token_embd.weight", (1000, 512))]
    untied = [*tied, TensorInfo("output.weight", (1000, 512))]
    assert choose_types(tied, "Q4_K_M", 1)["token_embd.weight"] == QT.Q6_K
    assert choose_types(untied, "Q4_K_M", 1)["token_embd.weight"] == QT.Q4_K
    assert choose_types(tied, "Q8_0", 1)["token_embd.weight"] == QT.Q8_0
    assert choose_types(tied, "Q4_0", 1)["token_embd.weight"] == QT.Q6_K


@pytest.mark.parametrize(
    ("ftype", "row", "expected"),
    [
        ("Q2_K", 576, QT.Q4_0),
        ("Q3_K_S", 576, QT.Q4_0),
        ("Q4_K_S", 576, QT.Q5_0),
        ("Q5_K_S", 576, QT.Q5_1),
        ("Q6_K", 576, QT.Q8_0),
        ("Q4_K_S", 80, QT.F16),
        ("Q8_0", 80, QT.F16),
        ("Q4_0", 96, QT.Q4_0),
        ("F16", 80, QT.F16),
    ],
)
def test_row_length_fallbacks(ftype, row, expected):
    t = TensorInfo("blk.5.ffn_up.weight", (64, row))
    assert choose_types([t], ftype, n_layer=8)[t.name] == expected


def test_only_weight_matrices_are_quantized():
    tensors = [
        TensorInfo("blk.0.attn_norm.weight", (256,)),
        TensorInfo("blk.0.ffn_gate_inp.weight", (8, 256)),
        TensorInfo("blk.0.attn_q.bias", (256, 256)),
        TensorInfo("blk.0.attn_q.weight", (1, 256)),  # ggml_n_dims == 1
        TensorInfo("rope_freqs.weight", (64,), QT.F32),
        TensorInfo("blk.0.attn_k.weight", (256, 256), QT.F16),
    ]
    types = choose_types(tensors, "Q5_K_M", n_layer=1)
    assert types == {
        "blk.0.attn_norm.weight": QT.F32,
        "blk.0.ffn_gate_inp.weight": QT.F32,
        "blk.0.attn_q.bias": QT.F32,
        "blk.0.attn_q.weight": QT.F32,
        "rope_freqs.weight": QT.F32,
        "blk.0.attn_k.weight": QT.Q5_K,
    }


def test_moe_and_large_models():
    tensors = [
        TensorInfo("blk.0.attn_v.weight", (512, 4096)),
        TensorInfo("blk.0.attn_k.weight", (512, 4096)),
        TensorInfo("blk.0.attn_output.weight", (4096, 4096)),
        TensorInfo("blk.0.ffn_down_exps.weight", (8, 4096, 14336)),
        TensorInfo("output.weight", (32000, 4096)),
    ]
    moe = choose_types(tensors, "Q4_K_M", n_layer=32, n_expert=8)
    assert moe["blk.0.attn_v.weight"] == moe["blk.0.attn_k.weight"] == QT.Q8_0
    assert moe["blk.0.attn_output.weight"] == QT.Q5_K
    assert moe["blk.0.ffn_down_exps.weight"] == QT.Q6_K  # layer 0 parsed from the name
    later = [TensorInfo(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(3)]
    assert choose_types(later, "Q3_K_M", n_layer=80, n_gqa=8)["blk.2.attn_v.weight"] == QT.Q5_K
    assert choose_types(later, "Q3_K_M", n_layer=80, n_gqa=1)["blk.2.attn_v.weight"] == QT.Q4_K
    qwen = choose_types(later, "Q3_K_M", n_layer=80, n_gqa=1, arch="qwen2")
    assert qwen["blk.2.attn_v.weight"] == QT.Q5_K  # qwen2's 80 layers are 70B without GQA too
    with pytest.raises(GGUFError, match="glm5-next"):
        choose_types(later, "Q4_K_M", n_layer=80, arch="glm5-next")
    with pytest.raises(GGUFError, match="layer"):
        choose_types([TensorInfo("ffn_down_exps.weight", (8, 256, 256))], "Q2_K", 4, n_expert=8)


def test_falcon_rules():
    down = [TensorInfo(f"blk.{i}.ffn_down.weight", (256, 256)) for i in range(16)]
    types = choose_types(down, "Q3_K_M", n_layer=16, arch="falcon")
    assert [types[t.name] for t in down[:4]] == [QT.Q5_K, QT.Q4_K, QT.Q3_K, QT.Q3_K]
    out = choose_types([TensorInfo("output.weight", (100, 256))], "Q4_K_M", 1, arch="falcon")
    assert out["output.weight"] == QT.Q8_0


def test_imatrix_changes_q4_0_ffn_down():
    down = [TensorInfo(f"blk.{i}.ffn_down.weight", (256, 256)) for i in range(8)]
    plain = choose_types(down, "Q4_0", n_layer=8)
    weighted = choose_types(down, "Q4_0", n_layer=8, has_imatrix=True)
    assert set(plain.values()) == {QT.Q4_0}
    assert (
        weighted["blk.0.ffn_down.weight"] == QT.Q4_1
        and weighted["blk.1.ffn_down.weight"] == QT.Q4_0
    )


def test_bits_per_weight():
    tensors = [TensorInfo("a.weight", (64, 256)), TensorInfo("b.weight", (64, 256))]
    assert mixtures.bits_per_weight(tensors, {"a.weight": QT.Q4_0, "b.weight": QT.Q4_0}) == 4.5
    mixed = {"a.weight": QT.Q4_K, "b.weight": QT.Q6_K}
    assert mixtures.bits_per_weight(tensors, mixed) == pytest.approx((4.5 + 6.5625) / 2)
    spec = SPECS["h256"]
    types = choose_types(spec.tensors(), "Q4_K_M", spec.n_layer, n_gqa=spec.n_gqa)
    assert 4.5 < mixtures.bits_per_weight(spec.tensors(), types) < 5.5


def test_unknown_file_type():
    with pytest.raises(GGUFError, match="unknown file type 'Q4_K_X'"):
        choose_types([], "Q4_K_X", n_layer=1)
