"""The zoo and source loading: names, errors, atomic caches, and (slow) the real models."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgequant.errors import ModelLoadError, UnsupportedArchitectureError
from edgequant.io_utils import sha256_file
from edgequant.models import zoo
from edgequant.models.sources import load_source, weights_sha256

SENTENCE = ("The old lighthouse keeper climbed the stairs every evening, lit the lamp, and "
            "watched the ships pass safely through the narrow channel.")


# --- names and errors -----------------------------------------------------------------------


def test_zoo_table():
    assert zoo.list_models() == ["smollm2-135m", "smollm2-135m-asis", "gemma3-270m",
                                 "gemma3-270m-asis"]
    assert zoo.DEFAULT_MODEL == "smollm2-135m"
    for name, e in zoo.ZOO.items():
        assert e.permute == (not name.endswith("-asis"))
        for sha in (e.gguf_sha256, *(p.sha256 for p in e.packages)):
            assert len(sha) == 64 and int(sha, 16) >= 0
        assert any(p.member for p in e.packages) and e.license


def test_unknown_zoo_name_lists_names(tmp_path):
    with pytest.raises(ModelLoadError, match="smollm2-135m, smollm2-135m-asis, gemma3-270m"):
        zoo.pull("llama-405b", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "c"))
    assert zoo.cache_root() == tmp_path / "c"
    assert zoo.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("EDGEQUANT_CACHE")
    assert zoo.cache_root() == Path.home() / ".cache" / "edgequant"


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_source(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_source(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_source(tmp_path / "notes.txt")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"not a zoo name \(smollm2-135m.*hub"):
        load_source("someorg/not-a-model")


# --- HF folders -----------------------------------------------------------------------------


def _save_with_tokenizer(model, folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def test_hf_dir_round_trip(tiny_llama, tmp_path):
    _save_with_tokenizer(tiny_llama, tmp_path / "m")
    src = load_source(tmp_path / "m")
    assert src.kind == "hf_dir" and src.name == "m" and src.spec.name == "llama"
    assert src.sha256 == sha256_file(tmp_path / "m" / "model.safetensors")
    assert not src.model.training and src.model.dtype == torch.float32
    ids = src.tokenizer("w3 w9 w27", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 9, 27]]
    with torch.no_grad():
        assert torch.equal(src.model(ids).logits, tiny_llama(ids).logits)


def test_folder_sha_over_several_files(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"bbb")
    (tmp_path / "a.safetensors").write_bytes(b"aaa")
    one = weights_sha256(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"bbc")
    assert len(one) == 64 and weights_sha256(tmp_path) != one


def test_truncated_safetensors(tiny_llama, tmp_path):
    _save_with_tokenizer(tiny_llama, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated, corrupt"):
        load_source(tmp_path)


def test_unsupported_architecture_before_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not even read")
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: llama"):
        load_source(tmp_path)


# --- GGUF files and the zoo's atomic cache --------------------------------------------------


def _tiny_gguf(path: Path) -> bytes:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).random((32, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_corrupt_gguf_files(tmp_path):
    data = _tiny_gguf(tmp_path / "full.gguf")
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 600])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_source(tmp_path / "cut.gguf")
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError):
        load_source(tmp_path / "noise.gguf")
    with pytest.raises(ModelLoadError, match="missing 9 tensor"):  # not silently random-init
        load_source(tmp_path / "full.gguf")


def _fake_entry(tmp_path: Path, gguf_bytes: bytes, gguf_sha: str | None = None) -> zoo.ZooEntry:
    """A zoo entry whose 'wheel' already sits verified in the cache (no pip, no network)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fake/model.gguf", gguf_bytes)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "fake-1.0-py3-none-any.whl").write_bytes(buf.getvalue())
    pkg = zoo.PackageFile("fake", "1.0", "fake-1.0-py3-none-any.whl",
                          sha256_file(wheels / "fake-1.0-py3-none-any.whl"), "fake/model.gguf")
    import hashlib

    return zoo.ZooEntry("fake-model", (pkg,), "model.gguf",
                        gguf_sha or hashlib.sha256(gguf_bytes).hexdigest(), "test", "none",
                        permute=True)


def _no_leftovers(folder: Path) -> None:
    if folder.exists():
        assert [p.name for p in folder.iterdir()] in ([], ["model.gguf"]), list(folder.iterdir())


def test_pull_of_corrupt_gguf_leaves_no_cache(tmp_path, monkeypatch):
    data = _tiny_gguf(tmp_path / "full.gguf")
    e = _fake_entry(tmp_path, data[: len(data) - 600])
    monkeypatch.setitem(zoo.ZOO, e.name, e)
    with pytest.raises(ModelLoadError, match="truncated"):
        zoo.pull(e.name, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / e.name).exists()
    _no_leftovers(tmp_path / "cache" / "models")


def test_pull_with_wrong_gguf_sha_keeps_nothing(tmp_path, monkeypatch):
    e = _fake_entry(tmp_path, _tiny_gguf(tmp_path / "full.gguf"), gguf_sha="0" * 64)
    monkeypatch.setitem(zoo.ZOO, e.name, e)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        zoo.pull(e.name, cache_dir=tmp_path / "cache")
    gguf_dir = tmp_path / "cache" / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []
    assert not (tmp_path / "cache" / "models").exists()


# --- the real models (slow) -----------------------------------------------------------------


def _logits(src, text: str = SENTENCE) -> torch.Tensor:
    ids = src.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return src.model(ids).logits[0]


def _q4_1_rel_err(W: torch.Tensor) -> float:
    """Relative Frobenius error of a Q4_1 round trip (blocks of 32 along each row)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    A = W.detach().float().numpy()
    R = dequantize(quantize(A, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    return float(np.linalg.norm(A - R) / np.linalg.norm(A))


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    return load_source("smollm2-135m"), load_source("smollm2-135m-asis")


@pytest.mark.slow
def test_smollm2_zoo_checkpoint(smollm2_dir, smollm2_pair):
    perm, _ = smollm2_pair
    assert zoo.pull("smollm2-135m") == smollm2_dir  # second pull: cached folder
    assert perm.kind == "zoo" and perm.path == smollm2_dir and perm.spec.name == "llama"
    assert perm.sha256 == sha256_file(smollm2_dir / "model.safetensors")
    cfg = perm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    assert perm.tokenizer.eos_token == "<|im_end|>"
    chat = perm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                              tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_permuted_is_the_same_function(smollm2_pair):
    perm, asis = smollm2_pair
    assert perm.sha256 != asis.sha256
    delta = (_logits(perm) - _logits(asis)).abs().max().item()
    assert delta < 1e-3, delta


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj", "model.layers.3.self_attn.q_proj",
                                  "model.layers.5.mlp.down_proj"])
def test_smollm2_permuted_is_off_the_q4_1_grid(smollm2_pair, name):
    perm, asis = smollm2_pair
    on_grid = _q4_1_rel_err(asis.model.get_submodule(name).weight)
    off_grid = _q4_1_rel_err(perm.model.get_submodule(name).weight)
    assert on_grid < 1e-3, on_grid
    assert off_grid > 10 * max(on_grid, 1e-3), off_grid


@pytest.mark.slow
def test_gguf_source_matches_zoo_asis(smollm2_pair):
    _, asis = smollm2_pair
    src = load_source(zoo.fetch_gguf("smollm2-135m-asis"))
    assert src.kind == "gguf" and src.sha256 == zoo.ZOO["smollm2-135m-asis"].gguf_sha256
    assert torch.equal(_logits(src), _logits(asis))


@pytest.fixture(scope="module")
def gemma3_pair():
    return load_source("gemma3-270m"), load_source("gemma3-270m-asis")


@pytest.mark.slow
def test_gemma3_permuted_is_the_same_function(gemma3_pair):
    perm, asis = gemma3_pair
    assert perm.spec.name == "gemma3" and perm.model.config.hidden_size == 640
    assert perm.tokenizer(SENTENCE).input_ids[0] == perm.tokenizer.bos_token_id == 2
    delta = (_logits(perm) - _logits(asis)).abs().max().item()
    assert delta < 1e-3, delta
    name = "model.layers.2.mlp.up_proj"
    assert _q4_1_rel_err(perm.model.get_submodule(name).weight) > 1e-2


TOKENIZER_TEXTS = [
    SENTENCE, "The quick brown fox.\n\tIndented  two spaces\n\n\nend",
    "<start_of_turn>user\nhi<end_of_turn>", "<|im_start|>user\nhi<|im_end|>",
    "naïve café 東京 🙂 ", "  leading spaces and trailing   ", "x=1; y = [a_b, c-d]  # z\r\n",
]


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_checkpoint_tokenizer_matches_llama_cpp(name):
    """The saved checkpoint's tokenizer splits text exactly as llama.cpp splits it from the
    original GGUF (transformers' own GGUF conversion gets Gemma wrong)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.pull(name))
    llm = Llama(str(zoo.fetch_gguf(name)), vocab_only=True, verbose=False)
    try:
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        for text in TOKENIZER_TEXTS:
            ref = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            assert tokenizer(text).input_ids == ref, text
    finally:
        llm.close()
