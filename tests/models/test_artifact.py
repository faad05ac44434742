import json

import pytest
import safetensors.torch
import torch

import edgequant as eq
from edgequant.errors import ArtifactError, OutputExistsError
from edgequant.models.artifact import MANIFEST, WEIGHTS, load_artifact
from edgequant.models.model import Model

from ..helpers import tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3, 64, 12, 7, 8]])


def quantized(module, scheme="w4g32", **kw):
    m = Model(module, tiny_tokenizer(module.config.vocab_size), {"name": "tiny", "sha256": "x"})
    return eq.quantize(m, "rtn", scheme=scheme, **kw)


@pytest.mark.parametrize("scheme", ["w4g32", "w3g24-asym", "w8-tensor", "w2g16-bf16"])
def test_reload_gives_identical_logits_llama(tiny_llama, tmp_path, scheme):
    q = quantized(tiny_llama, scheme)
    q.save(tmp_path / "a")
    r = load_artifact(tmp_path / "a")
    assert torch.equal(q.logits(IDS), r.logits(IDS))
    assert r.summary() == q.summary()
    assert r.recipe == q.recipe and r.layers == q.layers


def test_reload_tied_gemma_with_quantized_head(tiny_gemma3, tmp_path):
    q = quantized(tiny_gemma3, overrides=(("lm_head", "w8"),))
    q.save(tmp_path / "g")
    r = eq.load(tmp_path / "g")
    assert torch.equal(q.logits(IDS), r.logits(IDS))


def test_reload_tied_gemma_keeps_tie(tiny_gemma3, tmp_path):
    q = quantized(tiny_gemma3)
    q.save(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / MANIFEST).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    r = eq.load(tmp_path / "g")
    assert r.module.lm_head.weight is r.module.get_input_embeddings().weight
    assert torch.equal(q.logits(IDS), r.logits(IDS))


def test_no_overwrite_without_force(tiny_llama, tmp_path):
    q = quantized(tiny_llama)
    q.save(tmp_path / "a")
    with pytest.raises(OutputExistsError, match="--force"):
        q.save(tmp_path / "a")
    q.save(tmp_path / "a", force=True)
    assert load_artifact(tmp_path / "a").layers == q.layers


def test_failed_save_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    q = quantized(tiny_llama)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        q.save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_artifact(tiny_llama, tmp_path, monkeypatch):
    q = quantized(tiny_llama)
    q.save(tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS).read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        q.save(tmp_path / "a", force=True)
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.fixture
def saved(tiny_llama, tmp_path):
    quantized(tiny_llama).save(tmp_path / "a")
    return tmp_path / "a"


def test_corrupted_weights_are_refused(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(saved)


def test_truncated_weights_are_refused(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError):
        load_artifact(saved)


def _rewrite_weights(saved, tensors):
    """Replace the weights and re-sign them, so only layout validation can catch the change."""
    from edgequant.io_utils import sha256_file

    safetensors.torch.save_file(tensors, str(saved / WEIGHTS))
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(saved / WEIGHTS)
    (saved / MANIFEST).write_text(json.dumps(manifest))


def test_wrong_shape_is_named(saved):
    t = safetensors.torch.load_file(str(saved / WEIGHTS))
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:, :1].clone()
    _rewrite_weights(saved, t)
    with pytest.raises(ArtifactError, match=r"model\.layers\.0\.mlp\.up_proj\.scales.*shape"):
        load_artifact(saved)


def test_wrong_dtype_and_missing_names(saved):
    t = safetensors.torch.load_file(str(saved / WEIGHTS))
    t["model.norm.weight"] = t["model.norm.weight"].float()
    _rewrite_weights(saved, t)
    with pytest.raises(ArtifactError, match=r"model\.norm\.weight"):
        load_artifact(saved)
    del t["model.norm.weight"]
    _rewrite_weights(saved, t)
    with pytest.raises(ArtifactError, match="do not match"):
        load_artifact(saved)


def test_bad_manifest(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(saved)
    (saved / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an edgequant artifact"):
        load_artifact(saved)


def test_save_leaves_the_callers_model_alone(tiny_llama, tmp_path):
    """A source's quantization_config (a GPTQ checkpoint's) stays off the artifact's config
    and on the caller's model."""
    q = quantized(tiny_llama)
    q.module.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    q.save(tmp_path / "a")
    assert q.module.config.quantization_config == {"quant_method": "gptq", "bits": 4}
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())


@pytest.mark.parametrize("scheme", ["w4g32", "w3g24-asym", "nf4-dq", "w8a8"])
def test_info_from_the_header_is_the_loaded_summary(tiny_llama, tmp_path, scheme):
    """``artifact_info`` reads no weights and builds no model, and says what ``summary`` of
    the loaded model says; an older manifest (no quantized-tensor list) gives the same."""
    from edgequant.models.manifest import QUANTIZED_TENSORS, artifact_info

    if scheme == "w8a8":
        m = Model(tiny_llama, tiny_tokenizer(128), {"name": "tiny", "sha256": "x"})
        q = eq.quantize(m, "dynamic", scheme="w8a8")
    else:
        q = quantized(tiny_llama, scheme, overrides=(("lm_head", "w8"),))
    path = q.save(tmp_path / "a")
    info, summary = artifact_info(path), eq.load(path).summary()
    for key in ("layers", "num_params", "quantized_params", "quantized_bytes", "weight_bytes",
                "bits_per_weight", "bits_per_weight_total"):
        assert info[key] == summary[key], key
    assert info["size_bytes"] == (path / WEIGHTS).stat().st_size
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest[QUANTIZED_TENSORS]
    (path / MANIFEST).write_text(json.dumps(manifest))
    old = artifact_info(path)
    assert {**old, "dir_bytes": 0} == {**info, "dir_bytes": 0}  # the manifest is shorter


def test_a_tampered_tensor_list_is_refused(tiny_llama, tmp_path):
    from edgequant.models.manifest import QUANTIZED_TENSORS, artifact_info

    path = quantized(tiny_llama).save(tmp_path / "a")
    manifest = json.loads((path / MANIFEST).read_text())
    layer = next(iter(manifest[QUANTIZED_TENSORS]))
    manifest[QUANTIZED_TENSORS][layer].append("nope")
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks the stored tensors"):
        artifact_info(path)
    with pytest.raises(ArtifactError, match="do not match"):
        load_artifact(path)
