"""llama.cpp vs transformers on the zoo's real SmolLM2 GGUF (needs llama-cpp-python)."""

import importlib.util

import pytest

import edgequant as eq
from edgequant.data import corpus_tokens
from edgequant.eval.memory import measure_fresh
from edgequant.eval.perplexity import make_windows, score_windows

pytestmark = [
    pytest.mark.llama, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not importable"),
]


@pytest.fixture(scope="module")
def llama(gguf_path):
    with eq.open(gguf_path) as r:
        yield r


def test_llama_cpp_and_transformers_agree_on_the_same_file(gguf_path, llama):
    torch_r = eq.open(gguf_path, backend="torch")  # the same file, dequantized
    assert llama.backend == "llama.cpp" and torch_r.backend == "torch"
    assert llama.tokenizer_fingerprint() == torch_r.tokenizer_fingerprint()
    chat = [{"role": "user", "content": "Hi"}]
    assert llama.apply_chat_template(chat) == torch_r.apply_chat_template(chat)
    stream = corpus_tokens("wiki", llama)
    windows = make_windows(stream, 512, llama.bos_id, max_tokens=2048)
    ppl_llama = score_windows(llama, windows).ppl
    ppl_torch = score_windows(torch_r, windows).ppl
    assert abs(ppl_llama / ppl_torch - 1) < 0.01, (ppl_llama, ppl_torch)


def test_llama_interface(llama):
    ids = llama.tokenize("The capital of France is")
    assert llama.logits(ids).shape == (len(ids), 49152)
    out = llama.generate(ids, max_tokens=6, ignore_eos=True).token_ids
    assert len(out) == 6 and all(0 <= t < 49152 for t in out)
    assert llama.bos_id == 1 and not llama.add_bos
    info = llama.size_info()
    assert info["bits_per_weight"] == 5.0  # Q4_1: 4 bits + fp16 scale and min per 32
    assert info["num_params"] == 134_515_008 and info["size_bytes"] == 98_362_432


def test_gguf_memory_child_holds_no_torch(gguf_path):
    res = measure_fresh(str(gguf_path), "llama.cpp", [1] + list(range(100, 163)),
                        new_tokens=8, runs=1, warmup=0, threads=1)
    assert res["torch_imported"] is False
    assert 0 < res["rss_before_load_mb"] < res["peak_rss_mb"] < 600
    assert res["prefill_tps"] > 0 and res["decode_tps"] > 0 and res["threads"] == 1


def test_shared_prefix_logits_equal_each_sequence_on_its_own(llama):
    """Branches evaluated after one prefix (the KV cache rewound between them) give the
    logits of ``prefix + branch`` evaluated alone, and the prefix's own rows when the wanted
    rows reach back into it."""
    prefix = llama.tokenize("The capital of France is a city that")
    branches = [llama.tokenize(" many people visit"), [], llama.tokenize(" has a river.")]
    keep = [3, 2, 4]
    got = llama.logits_shared([(prefix, branches), ([], [branches[0]])], [keep, [2]])
    assert [len(g) for g in got] == [3, 1]
    for b, k, row in zip(branches, keep, got[0], strict=True):
        want = llama.logits([*prefix, *b])[-k:]
        assert row.shape == want.shape
        assert (row - want).abs().max() < 1e-2 * want.abs().max()
    assert (got[1][0] - llama.logits(branches[0])[-2:]).abs().max() < 1e-2
