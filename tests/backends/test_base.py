import sys

import pytest
import torch

import edgequant as eq
from edgequant.backends.base import Runnable, backend_names, engine_of, open_runnable
from edgequant.backends.torch_native import TorchRunnable
from edgequant.errors import ModelLoadError

from ..eval._tiny import TableRunnable, tiny_model


def test_open_dispatch():
    model = tiny_model()
    r = eq.open(model)
    assert isinstance(r, TorchRunnable) and isinstance(r, Runnable) and r.model is model
    fake = TableRunnable(torch.zeros(4, 4))
    assert open_runnable(fake) is fake
    assert {"llama.cpp", "torch"} <= set(backend_names())
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorrt'"):
        open_runnable(model, backend="tensorrt")


def test_registered_backends_are_asked_before_the_torch_fallback(monkeypatch):
    from edgequant.backends import base

    monkeypatch.setattr(base, "_BACKENDS", dict(base._BACKENDS))
    monkeypatch.setitem(sys.modules, "fake_backend_mod", type(sys)("fake_backend_mod"))
    sys.modules["fake_backend_mod"].open_fake = lambda source, **kw: ("fake", source)
    base.register_backend("fake", lambda s: s == "fake-model", "fake_backend_mod:open_fake")
    assert open_runnable("fake-model") == ("fake", "fake-model")


def test_context_manager_and_interface():
    with eq.open(tiny_model(add_bos=True)) as r:
        assert r.backend == "torch" and r.add_bos and r.bos_id == 256 and r.eos_id == 257
        ids = r.tokenize("hi <s>")
        assert ids == list(b"hi <s>")  # special-token text stays text by default
        assert r.tokenize("hi <s>", special=True) == [*b"hi ", 256]
        assert r.detokenize(ids) == "hi <s>"
        assert r.logits(ids).shape == (len(ids), 259) and r.logits(ids).dtype == torch.float32
        assert r.chat_template is None and engine_of(r) is r
        assert r.identity()["weights_sha256"] is None  # in memory: nothing cached under it


def test_gguf_without_llama_cpp_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ModelLoadError, match="llama-cpp-python is not importable"):
        eq.open(f)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    pytest.importorskip("llama_cpp")
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="llama.cpp cannot read"):
        eq.open(f)
