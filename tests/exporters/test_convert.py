"""HF -> GGUF conversion: names, q/k permutation, Gemma offsets, metadata, tokenizers, and
the end-to-end check that matters: llama.cpp computes the same logits as transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgequant.errors import GGUFError
from edgequant.exporters.convert import convert, permute_rows
from edgequant.exporters.gguf import export
from edgequant.gguf.reader import inspect_gguf
from edgequant.gguf.tokenizer import bpe_pre, tokenizer_kv
from edgequant.models.architectures import spec_for

from .tiny import TEXT, bpe_tokenizer, spm_tokenizer, text_ids, tiny

TT = gguf.TokenType
ARCHS = ["llama", "qwen2", "gemma3"]


def _pre(arch: str) -> str | None:
    return None if arch == "gemma3" else "gpt-2"


@pytest.fixture(scope="module")
def models():
    return {a: tiny(a) for a in ARCHS}


# --- tensors ---------------------------------------------------------------------------------


def test_permute_rows_is_llama_cpp_permute() -> None:
    # LlamaModel.permute: rows of each head go from [first half | second half] to pairs
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8
    p = permute_rows(w, 2)
    head0 = w[:8]
    expected0 = np.stack([head0[:4], head0[4:]], axis=1).reshape(8, 3)
    np.testing.assert_array_equal(p[:8], expected0)
    assert sorted(p[:, 0].tolist()) == sorted(w[:, 0].tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_names_shapes_and_values(models, arch: str) -> None:
    model = models[arch]
    conv = convert(model, pre=_pre(arch))
    spec = spec_for(model.module)
    expected = spec.gguf_names(model.module)  # HF name -> GGUF name (tied head left out)
    by_name = {t.name: t for t in conv.tensors}
    assert set(by_name) == set(expected.values())
    params = dict(model.module.named_parameters())
    cfg = model.module.config
    for hf, name in expected.items():
        t = by_name[name]
        src = params[hf].detach().numpy()
        data = t.load()
        assert data.dtype == np.float32 and data.shape == t.shape == src.shape, name
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
            np.testing.assert_array_equal(data, permute_rows(src, heads))
        elif arch == "gemma3" and "norm" in hf:
            np.testing.assert_allclose(data, src + 1.0, rtol=0, atol=1e-7)  # stored as w + 1
        else:
            np.testing.assert_array_equal(data, src)  # incl. qwen2 q/k (not permuted)
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in by_name and "blk.1.attn_v.bias" in by_name
    tied = "output.weight" not in by_name
    assert tied == (arch == "gemma3")


def test_gemma3_embedding_is_stored_unscaled(models) -> None:
    model = models["gemma3"]
    emb = next(t for t in convert(model).tensors if t.name == "token_embd.weight").load()
    np.testing.assert_array_equal(emb, model.module.model.embed_tokens.weight.detach().numpy())


@pytest.mark.parametrize("arch", ARCHS)
def test_hyperparameters(models, arch: str) -> None:
    cfg = models[arch].module.config
    kv = {k: v for k, v, *_ in convert(models[arch], pre=_pre(arch)).kv}
    assert kv[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert kv[f"{arch}.embedding_length"] == cfg.hidden_size
    assert kv[f"{arch}.feed_forward_length"] == cfg.intermediate_size
    assert kv[f"{arch}.attention.head_count"] == 4
    assert kv[f"{arch}.attention.head_count_kv"] == 2
    assert kv[f"{arch}.context_length"] == cfg.max_position_embeddings
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert kv[f"{arch}.attention.key_length"] == cfg.hidden_size // 4
    if arch == "llama":
        assert kv["llama.rope.dimension_count"] == cfg.hidden_size // 4
        assert kv["llama.rope.freq_base"] == 10000.0
    if arch == "gemma3":
        assert kv["gemma3.attention.sliding_window"] == 16
        assert kv["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert kv["gemma3.rope.freq_base"] == 1_000_000.0
        assert kv["gemma3.rope.freq_base_swa"] == 10_000.0


def test_llama3_rope_scaling_becomes_rope_freqs() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, vocab_size=len(bpe_tokenizer()),
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    conv = convert(LlamaForCausalLM(cfg), bpe_tokenizer(), pre="gpt-2")
    freqs = next(t for t in conv.tensors if t.name == "rope_freqs.weight").load()
    assert freqs.shape == (16,) and freqs[0] == 1.0 and freqs[-1] == 8.0


def test_gemma3_refuses_an_attention_scale_llama_cpp_does_not_use() -> None:
    model = tiny("gemma3", hidden=64)
    model.module.config.query_pre_attn_scalar = 256
    with pytest.raises(GGUFError, match="query_pre_attn_scalar"):
        convert(model)


def test_needs_a_tokenizer(models) -> None:
    with pytest.raises(GGUFError, match="tokenizer"):
        convert(models["llama"].module)


# --- tokenizers ------------------------------------------------------------------------------


def test_byte_level_bpe_vocab() -> None:
    tok = bpe_tokenizer()
    kv = tokenizer_kv(tok, vocab_size=len(tok) + 3, pre="gpt-2")
    assert kv.model == "gpt2" and kv.pre == "gpt-2" and kv.scores is None
    assert kv.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert kv.token_types[:3] == [TT.CONTROL] * 3 and kv.token_types[5] == TT.NORMAL
    assert kv.tokens[-1] == f"[PAD{len(tok) + 2}]" and kv.token_types[-1] == TT.UNUSED
    assert kv.merges and all(len(m.split(" ")) == 2 for m in kv.merges)
    assert kv.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert (kv.add_bos, kv.add_eos) == (False, False)
    assert kv.chat_template and "<|im_start|>" in kv.chat_template


def test_unknown_bpe_pre_tokenizer_is_refused_with_its_hash() -> None:
    tok = bpe_tokenizer()
    assert bpe_pre(tok) is None
    with pytest.raises(GGUFError, match="unknown BPE pre-tokenizer"):
        tokenizer_kv(tok, vocab_size=len(tok))


def test_sentencepiece_vocab() -> None:
    tok = spm_tokenizer()
    kv = tokenizer_kv(tok, vocab_size=len(tok))
    assert kv.model == "llama" and kv.pre == "default" and kv.merges is None
    assert kv.scores is not None and len(kv.scores) == len(kv.tokens) == len(tok)
    ids = {t: i for i, t in enumerate(kv.tokens)}
    assert kv.token_types[ids["<unk>"]] == TT.CONTROL  # an added special token, as llama.cpp
    assert kv.token_types[ids["<bos>"]] == TT.CONTROL
    assert kv.token_types[ids["<0x0A>"]] == TT.BYTE
    assert kv.add_bos and not kv.add_eos and kv.add_space_prefix
    # a merged piece scores higher (is merged earlier) than a piece from a later merge
    vocab = tok.get_vocab()
    merged = [p for p in vocab if p.startswith("\u2581") and len(p) > 2]
    assert kv.scores[vocab[merged[0]]] < 0


def test_wordlevel_tokenizer_is_refused() -> None:
    from tests.helpers import tiny_tokenizer

    with pytest.raises(GGUFError, match="WordLevel"):
        tokenizer_kv(tiny_tokenizer(128), vocab_size=128)


# --- end to end in llama.cpp -----------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_runs_in_llama_cpp_like_transformers(models, arch: str, tmp_path) -> None:
    import edgequant as eq

    model = models[arch]
    path = export(model, tmp_path / f"{arch}.gguf", "F32", tokenizer_pre=_pre(arch))
    ids = text_ids(model, 40)  # longer than gemma3's sliding window (16)
    with torch.no_grad():
        ref = model.module(torch.tensor([ids])).logits[0]
    with eq.open(str(path)) as r:
        text = " ".join(TEXT[:2])
        assert r.tokenize(text) == model.tokenizer.encode(text, add_special_tokens=False)
        got = r.logits(ids)
        out = r.generate(ids[:8], max_tokens=4, ignore_eos=True).token_ids
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    assert len(out) == 4 and out[0] == int(ref[7].argmax())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_our_f32_file_loads_back_through_transformers(models, arch: str, tmp_path) -> None:
    import edgequant as eq

    model = models[arch]
    path = export(model, tmp_path / f"{arch}.gguf", "F32", tokenizer_pre="gpt-2")
    back = eq.load(path)
    ids = torch.tensor([text_ids(model, 24)])
    with torch.no_grad():
        ref, got = model.module(ids).logits, back.module(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert back.tokenizer.encode(TEXT[0], add_special_tokens=False) == \
        model.tokenizer.encode(TEXT[0], add_special_tokens=False)


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_tokenizer_keys_match_the_original_gguf(smollm2_dir) -> None:
    """Our tokenizer keys equal those of the GGUF SmolLM2 shipped in (llama.cpp's converter)."""
    from transformers import AutoConfig, AutoTokenizer

    from edgequant.models import zoo

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    kv = tokenizer_kv(tok, cfg.vocab_size, cfg)
    original = inspect_gguf(zoo.fetch_gguf("smollm2-135m")).kv
    assert (kv.model, kv.pre) == ("gpt2", "smollm") == (original["tokenizer.ggml.model"],
                                                        original["tokenizer.ggml.pre"])
    assert kv.tokens == original["tokenizer.ggml.tokens"]
    assert kv.token_types == original["tokenizer.ggml.token_type"]
    assert kv.merges == original["tokenizer.ggml.merges"]
    assert kv.chat_template == original["tokenizer.chat_template"]
    assert kv.special_ids == {"bos": original["tokenizer.ggml.bos_token_id"],
                              "eos": original["tokenizer.ggml.eos_token_id"],
                              "unk": original["tokenizer.ggml.unknown_token_id"],
                              "pad": original["tokenizer.ggml.padding_token_id"]}
    assert kv.add_bos is original["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.slow
@pytest.mark.llama
def test_smollm2_f32_perplexity_in_llama_cpp_matches_transformers(smollm2_dir, tmp_path) -> None:
    """Same tokens, same windows: llama.cpp on our F32 file within 0.5% of transformers."""
    import edgequant as eq

    model = eq.load(smollm2_dir)
    path = eq.export(model, tmp_path / "smollm2-f32.gguf", "F32")
    opts = dict(corpus="wiki", ctx=512, max_tokens=4096)
    ours = eq.evaluate(str(path), ["ppl"], **opts)
    ref = eq.evaluate(model, ["ppl"], **opts)
    assert ours.tokens_scored == ref.tokens_scored > 3000
    assert abs(ours.ppl / ref.ppl - 1) < 0.005, (ours.ppl, ref.ppl)


@pytest.mark.slow
@pytest.mark.llama
def test_gemma3_270m_matches_llama_cpps_converter_and_runs_alike(tmp_path) -> None:
    """Real Gemma 3: tokenizer and hyper-parameters equal those of the GGUF made by llama.cpp's
    converter (the zoo's source file); our F32 file gives transformers' logits in llama.cpp,
    beyond the sliding window (512) too."""
    import edgequant as eq
    from edgequant.data.tokens import corpus_tokens
    from edgequant.models import zoo

    original = inspect_gguf(zoo.fetch_gguf("gemma3-270m")).kv
    model = eq.load("gemma3-270m")
    path = eq.export(model, tmp_path / "gemma3-f32.gguf", "F32")
    ours = inspect_gguf(path).kv
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"):
        assert ours[key] == original[key], key
    for key in [k for k in original if k.startswith("gemma3.")]:
        assert ours[key] == pytest.approx(original[key]), key
    ids = [model.tokenizer.bos_token_id, *corpus_tokens("wiki", model.tokenizer)[:639].tolist()]
    with torch.no_grad():
        ref = model.module(torch.tensor([ids])).logits[0].double()
    with eq.open(str(path)) as r:
        got = r.logits(ids).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    assert float(kld.mean()) < 1e-4 and float(kld[512:].mean()) < 1e-4
    assert float((got.argmax(-1) == ref.argmax(-1)).double().mean()) > 0.99
