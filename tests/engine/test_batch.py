"""Batched decode across independent sequences: ``Engine.decode_batch`` against per-state
``decode``, and ``Engine.step_batch`` against stepping each generation alone.

Float32 tiny models agree to ~1e-6 (not bit-exact: a batched forward multiplies a
``(B, K)`` activation by each weight where a lone step multiplies ``(1, K)``, and the two
matmuls may sum in another order; attention then also runs with a padding mask). bfloat16
rows agree to a bf16 rounding step of the largest logit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import edgequant as eq
from edgequant.engine import EngineError, Generation, SamplingParams
from edgequant.engine.text import TextDecoder
from edgequant.engine.torch_engine import TorchEngine, TorchState
from edgequant.models.model import Model

from ..eval._tiny import byte_tokenizer, tiny_module
from ._models import cycle_engine

CYCLE = "A€b🚀c"
LENGTHS = (9, 1, 23, 4)          # a state of one token too
ATOL = 3e-5                      # float32, logits of magnitude ~10


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(tiny_module(), byte_tokenizer(), name="tiny")


def _forwards(engine: TorchEngine) -> list[int]:
    """Counts the module's forward calls (appends 1 per call)."""
    calls: list[int] = []
    engine.module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _prompts(n: int, lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 250, lengths[i % len(lengths)])] for i in range(n)]


def _twins(engine, prompts: list[list[int]]) -> tuple[list, list]:
    """Two states per prompt, both prefilled: one to batch, one to decode alone."""
    batched, alone = [], []
    for p in prompts:
        for group in (batched, alone):
            st = engine.new_state()
            engine.prefill(st, p)
            group.append(st)
    return batched, alone


def _check_rows(engine, batched, alone, steps: int, atol: float, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        toks = [int(t) for t in rng.integers(0, 250, len(batched))]
        got = engine.decode_batch(batched, toks)
        want = np.stack([engine.decode(st, t) for st, t in zip(alone, toks, strict=True)])
        assert got.shape == (len(batched), engine.vocab_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


def _check_continues_alone(engine, batched, alone, atol: float) -> None:
    """After batching, each state decodes alone as its never-batched twin does, and its
    cache holds the same shapes."""
    for b, a in zip(batched, alone, strict=True):
        for lb, la in zip(b.cache.layers, a.cache.layers, strict=True):
            assert type(lb) is type(la) and lb.keys.shape == la.keys.shape
            torch.testing.assert_close(lb.keys, la.keys, rtol=0, atol=atol)
        for t in (5, 77):
            np.testing.assert_allclose(engine.decode(b, t), engine.decode(a, t), rtol=0,
                                       atol=atol)


# --- decode_batch on torch ------------------------------------------------------------------

def test_batched_rows_equal_per_state_rows_in_one_forward(engine):
    batched, alone = _twins(engine, _prompts(4))
    fresh, twin = engine.new_state(), engine.new_state()   # prefilled just before the batch
    for st in (fresh, twin):
        engine.prefill(st, [3, 1, 4])
    batched.append(fresh)
    alone.append(twin)
    calls = _forwards(engine)
    _check_rows(engine, batched, alone, steps=6, atol=ATOL)
    assert len(calls) == 6 * (1 + len(alone))   # one forward per batched step
    _check_continues_alone(engine, batched, alone, atol=ATOL)


def test_states_leave_rewind_and_rejoin_the_batch(engine):
    """Between batched steps a state may decode alone, be rewound, leave, or come back in
    another order: each batched step still sees exactly each state's own cache."""
    batched, alone = _twins(engine, _prompts(3))
    _check_rows(engine, batched, alone, steps=3, atol=ATOL)
    for group in (batched, alone):
        engine.decode(group[0], 11)
        engine.rewind(group[1], len(group[1]) - 2)
    _check_rows(engine, batched, alone, steps=2, atol=ATOL)
    order = [2, 0, 1]
    _check_rows(engine, [batched[i] for i in order], [alone[i] for i in order], steps=2,
                atol=ATOL, seed=2)
    _check_rows(engine, batched[1:], alone[1:], steps=2, atol=ATOL, seed=3)
    _check_continues_alone(engine, batched, alone, atol=ATOL)


def test_an_empty_state_and_a_batch_of_one(engine):
    empty, twin = engine.new_state(), engine.new_state()
    full, full_twin = _twins(engine, _prompts(1))
    got = engine.decode_batch([empty, full[0]], [7, 8])
    np.testing.assert_allclose(got, np.stack([engine.decode(twin, 7),
                                              engine.decode(full_twin[0], 8)]),
                               rtol=0, atol=ATOL)
    a, b = _twins(engine, _prompts(1))
    one = engine.decode_batch(a, [9])         # B = 1 is the plain decode, bit for bit
    np.testing.assert_array_equal(one[0], engine.decode(b[0], 9))
    assert engine.decode_batch([], []).shape == (0, engine.vocab_size)


def test_eager_attention_batches_with_an_additive_mask():
    module = tiny_module(layers=2)
    module.config._attn_implementation = "eager"
    eng = TorchEngine(module, byte_tokenizer(), name="eager")
    batched, alone = _twins(eng, _prompts(3))
    calls = _forwards(eng)
    _check_rows(eng, batched, alone, steps=4, atol=ATOL)
    assert len(calls) == 4 * 4
    _check_continues_alone(eng, batched, alone, atol=ATOL)


def test_gemma3_sliding_window_and_full_layers_batch_past_the_window():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96,
                              vocab_size=259, max_position_embeddings=256, sliding_window=8,
                              query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"])
    torch.manual_seed(0)
    eng = TorchEngine(Gemma3ForCausalLM(config).eval(), byte_tokenizer(), name="gemma3")
    # lengths below, at and past the window of 8
    batched, alone = _twins(eng, _prompts(4, lengths=(3, 7, 12, 30)))
    assert eng._batch_kinds(batched) == ["sliding", "full", "sliding"]
    calls = _forwards(eng)
    _check_rows(eng, batched, alone, steps=8, atol=1e-5)
    assert len(calls) == 8 * 5
    _check_continues_alone(eng, batched, alone, atol=1e-5)
    assert all(s.cache.layers[0].keys.shape[-2] == 7 for s in batched)   # the window kept


def test_a_cache_it_cannot_batch_decodes_per_state(engine):
    class OwnCache(DynamicCache):
        """A cache class the batched step does not know (it may store anything)."""

    class Own(TorchEngine):
        def new_state(self, capacity=None):
            return TorchState(self, capacity or self.max_context,
                              OwnCache(config=self.module.config))

    lazy = Own(engine.module, engine.tokenizer, name="own")
    batched, alone = _twins(lazy, _prompts(3))
    calls = _forwards(lazy)
    _check_rows(lazy, batched, alone, steps=2, atol=0)   # the same passes: bit for bit
    assert len(calls) == 2 * 6


def test_bfloat16_rows_agree_to_bf16_rounding():
    module = tiny_module().to(torch.bfloat16)
    eng = TorchEngine(module, byte_tokenizer(), name="bf16")
    batched, alone = _twins(eng, _prompts(4))
    # a bf16 logit of magnitude ≤ 16 is rounded to 1/16: allow two such steps
    _check_rows(eng, batched, alone, steps=4, atol=2 / 16)


def test_native_int4_kernel_takes_the_batch_as_b_rows(tmp_path, monkeypatch):
    from edgequant.kernels import int4_cpu

    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, vocab_size=259,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = Model(LlamaForCausalLM(config).eval(), byte_tokenizer(),
                  {"name": "tiny-128", "path": None, "sha256": None, "kind": "memory"})
    eq.quantize(model, "rtn", scheme="w4g128").save(tmp_path / "art")
    eng = eq.open(tmp_path / "art", dtype="bfloat16")
    if eng.runtime["kernels"] != {"int4_cpu": 14}:
        pytest.skip(f"the int4 CPU kernel does not run here: {eng.runtime}")
    rows: list[int] = []
    real = int4_cpu.Int4CpuKernel.matmul

    def spy(self, x, packed, bias):
        rows.append(x.numel() // packed.shape[1])
        return real(self, x, packed, bias)

    batched, alone = _twins(eng, _prompts(4))
    monkeypatch.setattr(int4_cpu.Int4CpuKernel, "matmul", spy)
    eng.decode_batch(batched, [1, 2, 3, 4])
    assert rows == [4] * 14            # every quantized layer saw one (4, K) input
    for st, t in zip(alone, [1, 2, 3, 4], strict=True):
        eng.decode(st, t)
    _check_rows(eng, batched, alone, steps=3, atol=2 / 64)


def test_bad_input_is_a_clear_error_and_advances_nothing(engine):
    other = TorchEngine(tiny_module(), byte_tokenizer(), name="other")
    a, b = engine.new_state(), engine.new_state(capacity=2)
    engine.prefill(a, [1, 2])
    engine.prefill(b, [1, 2])
    dead = engine.new_state()
    engine.release(dead)
    cases = [([a, a], [1, 2], "state 1 appears twice"),
             ([a, dead], [1, 2], "was released"),
             ([a, other.new_state()], [1, 2], "belongs to another engine"),
             ([a], [1, 2], "1 states but 2 tokens"),
             ([a, b], [1, 2], "state 1 is full"),
             ([a], [10_000], "outside the vocabulary")]
    for states, toks, msg in cases:
        with pytest.raises(EngineError, match=msg):
            engine.decode_batch(states, toks)
    assert a.tokens == [1, 2] and a.cache.get_seq_length() == 2
    with pytest.raises(EngineError, match="generation 1 appears twice"):
        g = engine.start("Hi")
        engine.step_batch([g, g])
    with pytest.raises(EngineError, match="not a Generation of this engine"):
        engine.step_batch([engine.start("Hi"), other.start("Hi")])


# --- step_batch -----------------------------------------------------------------------------

def _trace(gens: list[Generation], batched: bool, join: dict[int, list[Generation]] | None = None
           ) -> Iterator[tuple[int, list[str]]]:
    """Step ``gens`` to the end (batched or one by one), adding ``join[k]`` at step ``k``;
    yields each step's deltas."""
    gens, k = list(gens), 0
    while any(g.active for g in gens) or (join and any(i >= k for i in join)):
        gens += (join or {}).get(k, [])
        if batched:
            yield k, gens[0].engine.step_batch(gens)
        else:
            yield k, [g.step() if g.active else "" for g in gens]
        k += 1


def _same(engine, requests: list[tuple[str, dict]], join_at: dict[int, int] | None = None
          ) -> list[Generation]:
    """Runs the requests batched and one by one (each request ``i`` in ``join_at`` joins
    at that step); asserts equal deltas, tokens, text and finish reasons."""
    runs = []
    for batched in (True, False):
        gens = [engine.start(p, **kw) for p, kw in requests]
        join_at = join_at or {}
        first = [g for i, g in enumerate(gens) if i not in join_at]
        join: dict[int, list[Generation]] = {}
        for i, k in join_at.items():
            join.setdefault(k, []).append(gens[i])
        deltas: dict[int, list[str]] = {id(g): [] for g in gens}
        order = first + [g for k in sorted(join) for g in join[k]]
        for _, ds in _trace(first, batched, join):
            for g, d in zip(order, ds, strict=False):
                deltas[id(g)].append(d)
        runs.append((gens, deltas))
    (gb, db), (ga, da) = runs
    for b, a in zip(gb, ga, strict=True):
        assert b.error is None and b.finished, b.error
        rb, ra = b.result(), a.result()
        assert (rb.token_ids, rb.text, rb.finish_reason) == (ra.token_ids, ra.text,
                                                              ra.finish_reason)
        assert db[id(b)] == da[id(a)]
        assert "".join(db[id(b)]) == rb.text
    return gb


def test_step_batch_is_stepping_each_alone_greedy_and_seeded(engine):
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7,
                             ignore_eos=True)
    gens = _same(engine, [("Once upon a time", {"max_tokens": 12, "ignore_eos": True}),
                          ("Hello", {"params": sampled}),
                          ("Hello", {"params": sampled, "seed": 8}),
                          ("The quick brown fox", {"max_tokens": 5, "ignore_eos": True}),
                          ("x", {"max_tokens": 0})])
    assert [g.result().completion_tokens for g in gens] == [12, 12, 12, 5, 0]
    assert gens[1].result().token_ids != gens[2].result().token_ids   # the seeds differ
    assert gens[4].result().finish_reason == "length"


def test_step_batch_stop_strings_eos_and_finishing_mid_batch():
    eng = cycle_engine(CYCLE)
    gens = _same(eng, [("A", {"max_tokens": 40, "stop": ["zzz", "🚀c"]}),
                       ("A", {"max_tokens": 40, "stop": ["A€b"]}),
                       ("b", {"max_tokens": 7}),
                       ("A", {"max_tokens": 14, "stop": ["b🚀d"]}),
                       ("A", {"max_tokens": 11, "stop": ["A€x"]}),
                       ("c", {"max_tokens": 30, "stop_token_ids": [ord("c")]})])
    assert [g.result().text for g in gens] == ["€b", "€b🚀c", "🚀cA\ufffd", "€b🚀cA€b",
                                               "€b🚀cA\ufffd", "A€b🚀"]
    assert [g.result().finish_reason for g in gens] == ["stop", "stop", "length", "length",
                                                        "length", "stop"]
    eos = cycle_engine("xyz", then_eos=True)
    gens = _same(eos, [("x", {"max_tokens": 10}), ("y", {"max_tokens": 10}),
                       ("x", {"max_tokens": 10, "ignore_eos": True})])
    assert [g.result().finish_reason for g in gens] == ["eos", "eos", "length"]


def test_generations_join_the_batch_while_others_decode(engine):
    """Prefill and decode in one call: a request joining at step k is prefilled alone while
    the running ones decode together."""
    calls = _forwards(engine)
    _same(engine, [("Once upon a time", {"max_tokens": 10, "ignore_eos": True}),
                   ("Hi", {"max_tokens": 6, "ignore_eos": True}),
                   ("The capital of", {"max_tokens": 8, "ignore_eos": True}),
                   ("def f(x):", {"max_tokens": 3, "ignore_eos": True})],
          join_at={1: 2, 2: 4, 3: 4})
    # looped: a pass per token (27). Batched: a pass per prefill (4) and one per step that
    # had a decoding generation (steps 1-11: 11), whatever the number decoding
    assert len(calls) == 27 + 4 + 11


def test_a_failing_generation_is_closed_and_the_others_go_on(engine):
    want = [engine.generate(p, max_tokens=8, ignore_eos=True).token_ids
            for p in ("Once upon a time", "Hello")]
    gens = [engine.start(p, max_tokens=8, ignore_eos=True)
            for p in ("Once upon a time", "Broken", "Hello", "Broken too")]
    engine.step_batch(gens)                     # all prefilled
    engine.release(gens[1].state)               # pulled from under it: its decode fails
    deltas = engine.step_batch(gens)
    assert isinstance(gens[1].error, EngineError) and "released" in str(gens[1].error)
    assert not gens[1].active and not gens[1].finished and deltas[1] == ""

    def broken(ids):
        raise RuntimeError("detokenizer down")

    gens[3]._decoder = TextDecoder(broken)      # fails after the batched pass succeeded
    while any(g.active for g in gens):
        engine.step_batch(gens)
    assert isinstance(gens[3].error, RuntimeError) and not gens[3].active
    assert [gens[0].result().token_ids, gens[2].result().token_ids] == want
    with pytest.raises(EngineError, match="has not finished"):
        gens[1].result()


# --- llama.cpp ------------------------------------------------------------------------------

llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                           reason="llama-cpp-python is not importable")


@pytest.fixture(scope="module")
def gguf_engine(gguf_path):
    from edgequant.engine.llamacpp_engine import LlamaCppEngine

    with LlamaCppEngine(gguf_path, threads=1, parallel=8, n_ctx=1024) as e:
        yield e


@llama
@pytest.mark.llama
@pytest.mark.slow
def test_llama_batched_rows_are_one_decode_of_per_sequence_tokens(gguf_engine, monkeypatch):
    """One ``llama_decode`` per step. llama.cpp is not batch-invariant: its quantized
    matmuls round the activations to 8 bits per block, so a row computed in another batch
    shape (or with its cells elsewhere in the shared cache) may land on neighbouring
    codes — differences of up to ~3 % of the largest logit, which is also how far a lone
    decode is from a full-sequence forward of the same tokens. So: the same argmax, and
    the same bound as that decode-vs-forward difference."""
    eng = gguf_engine
    texts = ("The capital of France is", "Once upon a time, there was a little",
             "def fibonacci(n):\n    ", "Water boils at")
    prompts = [eng.encode_prompt(t) for t in texts]
    batched, alone = [], []
    for p in prompts:
        for group in (batched, alone):
            st = eng.new_state(64)
            eng.prefill(st, p)
            group.append(st)
    lib = eng._lib
    real, calls = lib.llama_decode, []
    monkeypatch.setattr(lib, "llama_decode", lambda *a: calls.append(1) or real(*a))
    seqs = [list(p) for p in prompts]
    toks = [eng.tokenize(w)[0] for w in (" Paris", " girl", "if", " 100")]
    for _ in range(6):
        calls.clear()
        got = eng.decode_batch(batched, toks)
        assert len(calls) == 1
        want = np.stack([eng.decode(st, t) for st, t in zip(alone, toks, strict=True)])
        for s, t in zip(seqs, toks, strict=True):
            s.append(t)
        assert (got.argmax(1) == want.argmax(1)).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())
        toks = [int(r) for r in got.argmax(1)]
    # a batched row against one forward of the sequence's whole text
    for st, s in zip(batched, seqs, strict=True):
        assert st.tokens == s
    for st in batched + alone:
        eng.release(st)
    with eng.new_state(64) as st:
        full = eng.forward(st, seqs[0], rows=1)[0]
    with eng.new_state(64) as st:
        eng.prefill(st, seqs[0][:-1])
        other = eng.new_state(64)
        eng.prefill(other, seqs[1][:-1])
        got = eng.decode_batch([st, other], [seqs[0][-1], seqs[1][-1]])
        eng.release(other)
    assert got[0].argmax() == full.argmax()
    np.testing.assert_allclose(got[0], full, rtol=0, atol=0.05 * np.abs(full).max())


@llama
@pytest.mark.llama
@pytest.mark.slow
def test_llama_step_batch_is_stepping_each_alone(gguf_engine):
    eng = gguf_engine
    _same(eng, [("The capital of France is", {"max_tokens": 12}),
                ("Tell me a story.", {"max_tokens": 10, "temperature": 0.8, "top_k": 40,
                                      "top_p": 0.9, "seed": 3, "ignore_eos": True}),
                ("def fibonacci(n):", {"max_tokens": 16, "stop": ["\n\n"]}),
                ("Hi", {"max_tokens": 0})],
          join_at={2: 3})
    a, b = eng.new_state(8), eng.new_state(8)
    with pytest.raises(EngineError, match="state 1 appears twice"):
        eng.decode_batch([a, a], [1, 1])
    eng.release(b)
    with pytest.raises(EngineError, match="was released"):
        eng.decode_batch([a, b], [1, 1])
    eng.release(a)
