"""The llama.cpp engine on the zoo's real SmolLM2 GGUF: sequences of one context as states."""

import importlib.util

import numpy as np
import pytest

import edgequant as eq
from edgequant.engine import EngineError, SamplingParams
from edgequant.engine.llamacpp_engine import LlamaCppEngine

pytestmark = [
    pytest.mark.llama, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not importable"),
]


@pytest.fixture(scope="module")
def engine(gguf_path):
    with LlamaCppEngine(gguf_path, threads=1, parallel=3) as e:
        yield e


def test_greedy_generation_equals_argmax_of_full_sequence_logits(engine):
    prompt = engine.encode_prompt("The capital of France is")
    res = engine.generate(prompt, max_tokens=12, ignore_eos=True)
    with engine.new_state(len(prompt) + 12) as st:
        rows = engine.forward(st, prompt + res.token_ids, rows=len(prompt) + 12)
    assert res.token_ids == [int(r.argmax()) for r in rows[len(prompt) - 1:-1]]
    assert res.text.startswith(" Paris")


def test_interleaved_states_are_independent(engine):
    prompts = [engine.encode_prompt(t) for t in ("Once upon a time", "def fibonacci(n):")]
    alone = [engine.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in prompts]
    gens = [engine.start(p, max_tokens=8, ignore_eos=True) for p in prompts]
    for _ in range(8):
        for g in gens:
            g.step()
    assert [g.result().token_ids for g in gens] == alone


def test_rewind_drops_the_cells_past_the_prefix(engine):
    prefix, b1, b2 = (engine.tokenize(t) for t in ("The capital of", " France", " Spain is"))
    with engine.new_state(64) as st:
        engine.forward(st, prefix + b1, rows=1)
        engine.rewind(st, len(prefix))
        rows = engine.forward(st, b2, rows=len(b2))
    with engine.new_state(64) as st:
        want = engine.forward(st, prefix + b2, rows=len(b2))
    np.testing.assert_allclose(rows, want, atol=1e-3 * np.abs(want).max())


def test_sampling_and_stop_strings(engine):
    p = SamplingParams(max_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                       ignore_eos=True)
    one = engine.generate("Tell me a story.", p).token_ids
    assert engine.generate("Tell me a story.", p).token_ids == one
    assert engine.generate("Tell me a story.", p, seed=4).token_ids != one
    full = engine.generate("The capital of France is", max_tokens=16, ignore_eos=True)
    assert "\n\n" in full.text   # " Paris.\n\nThe United States …"
    deltas: list[str] = []
    res = engine.generate("The capital of France is", max_tokens=16, stop=["\n\n"],
                          on_text=deltas.append)
    assert res.finish_reason == "stop" and res.text == full.text.split("\n\n")[0]
    assert "".join(deltas) == res.text


def test_chat_template_equals_the_tokenizers_own(engine, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for gen_prompt in (True, False):
        assert engine.apply_chat_template(msgs, gen_prompt) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen_prompt)
    res = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      max_tokens=24)
    assert res.text.strip() and "<|im_end|>" not in res.text and "<|im_start|>" not in res.text


def test_states_are_sequences_of_one_context(engine):
    states = [engine.new_state(32) for _ in range(3)]
    assert sorted(s.seq_id for s in states) == [0, 1, 2]
    with pytest.raises(EngineError, match="all 3 sequences of the context are in use"):
        engine.new_state(32)
    with pytest.raises(EngineError, match="does not fit the context of .* other state"):
        engine.new_state(engine.n_ctx + 1)
    engine.release(states[1])
    again = engine.new_state(32)
    assert again.seq_id == 1
    del states, again   # dropped without release: their sequences come back
    import gc

    gc.collect()
    n = engine.n_ctx
    with engine.new_state(n + 1) as big:   # no live state: the context grows
        assert engine.n_ctx > n and big.capacity == n + 1


def test_open_returns_an_engine_that_scores_too(gguf_path):
    with eq.open(gguf_path, threads=1) as r:
        res = r.generate("The capital of France is", max_tokens=4)
        ids = r.encode_prompt("The capital of France is")
        assert int(r.logits(ids)[-1].argmax()) == res.token_ids[0]
