"""The torch engine on tiny in-memory models: KV states against full-sequence logits,
independent states, sampling, stop strings, streaming and the chat template."""

import numpy as np
import pytest
import torch

import edgequant as eq
from edgequant.engine import Engine, EngineError, SamplingParams
from edgequant.engine.torch_engine import TorchEngine

from ..eval._tiny import CHAT_TEMPLATE, byte_tokenizer, tiny_model, tiny_module
from ._models import EOS, cycle_engine

CYCLE = "A€b🚀c"   # distinct bytes; € and 🚀 span 3 and 4 tokens


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(tiny_module(), byte_tokenizer(chat=True), name="tiny")


def _full_logits(engine: TorchEngine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return engine.module(torch.tensor([ids])).logits[0]


def test_greedy_generation_equals_argmax_of_full_sequence_logits(engine):
    prompt = engine.encode_prompt("Once upon a time")
    res = engine.generate(prompt, max_tokens=16, ignore_eos=True)
    ids = list(prompt)
    for _ in range(16):
        ids.append(int(_full_logits(engine, ids)[-1].argmax()))
    assert res.token_ids == ids[len(prompt):]
    assert res.finish_reason == "length" and res.completion_tokens == 16
    assert res.prompt_tokens == len(prompt)
    assert res.text == engine.detokenize(res.token_ids) == str(res)
    assert 0 < res.ttft_s <= res.total_s and res.prefill_s > 0 and res.decode_s > 0


def test_prefill_and_decode_rows_equal_full_sequence_rows(engine):
    ids = engine.encode_prompt("The quick brown fox")
    with engine.new_state() as st:
        first = engine.prefill(st, ids[:-3])
        steps = [engine.decode(st, t) for t in ids[-3:]]
        assert st.tokens == ids and len(st) == len(ids)
    want = _full_logits(engine, ids).numpy()
    np.testing.assert_allclose(np.stack([first, *steps]), want[-4:], atol=1e-4, rtol=1e-4)
    with engine.new_state() as st:
        rows = engine.forward(st, ids, rows=len(ids))
    np.testing.assert_allclose(rows, want, atol=1e-4, rtol=1e-4)


def test_interleaved_states_are_independent(engine):
    prompts = [engine.encode_prompt("Once upon a time"), engine.encode_prompt("Hello, world")]
    alone = [engine.generate(p, max_tokens=10, ignore_eos=True).token_ids for p in prompts]
    gens = [engine.start(p, max_tokens=10, ignore_eos=True) for p in prompts]
    while not all(g.finished for g in gens):
        for g in gens:
            if not g.finished:
                g.step()
    assert [g.result().token_ids for g in gens] == alone
    # by hand, with explicit states and one more live state in between
    a, b = engine.new_state(), engine.new_state()
    ta, tb = [int(engine.prefill(a, prompts[0]).argmax())], [int(engine.prefill(b, prompts[1])
                                                                  .argmax())]
    for _ in range(9):
        tb.append(int(engine.decode(b, tb[-1]).argmax()))
        ta.append(int(engine.decode(a, ta[-1]).argmax()))
    assert [ta, tb] == alone


def test_rewind_gives_the_logits_of_the_shorter_sequence(engine):
    prefix, b1, b2 = (engine.tokenize(t) for t in ("The capital of", " France", " Spain is"))
    with engine.new_state() as st:
        engine.forward(st, prefix + b1, rows=1)
        engine.rewind(st, len(prefix))
        assert st.tokens == prefix
        rows = engine.forward(st, b2, rows=len(b2))
    want = _full_logits(engine, prefix + b2)[-len(b2):].numpy()
    np.testing.assert_allclose(rows, want, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_repeats_and_different_seeds_differ(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, ignore_eos=True)
    one = engine.generate("Hi", p, seed=11).token_ids
    assert engine.generate("Hi", p, seed=11).token_ids == one
    assert engine.generate("Hi", p, seed=12).token_ids != one
    greedy = engine.generate("Hi", max_tokens=20, ignore_eos=True).token_ids
    assert engine.generate("Hi", p, top_k=1, seed=5).token_ids == greedy


def test_a_known_continuation_streams_whole_characters():
    eng = cycle_engine(CYCLE)
    deltas: list[str] = []
    res = eng.generate("A", max_tokens=2 * len(CYCLE.encode()), on_text=deltas.append)
    assert res.text == "€b🚀cA€b🚀cA" and "".join(deltas) == res.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_split_across_tokens_is_cut_and_never_streamed():
    eng = cycle_engine(CYCLE)
    for stop, text in [("b🚀", "€"), ("🚀c", "€b"), ("cA", "€b🚀"), ("A€b", "€b🚀c")]:
        deltas: list[str] = []
        res = eng.generate("A", max_tokens=40, stop=["zzz", stop], on_text=deltas.append)
        assert res.finish_reason == "stop" and res.text == text, stop
        assert "".join(deltas) == text   # nothing of the stop string was ever streamed
        assert len(res.token_ids) == len(text.encode()) + len(stop.encode())


def test_a_stop_prefix_that_does_not_complete_is_streamed():
    eng = cycle_engine(CYCLE)
    deltas: list[str] = []
    res = eng.generate("A", max_tokens=14, stop=["b🚀d"], on_text=deltas.append)
    assert res.finish_reason == "length" and res.text == "€b🚀cA€b"
    assert "".join(deltas) == res.text
    # ended inside a character: it is flushed as U+FFFD, the stop's prefix before it too
    res = eng.generate("A", max_tokens=11, stop=["A€x"])
    assert res.text == "€b🚀cA\ufffd"


def test_finish_reasons_eos_stop_token_and_length():
    eng = cycle_engine("xyz", then_eos=True)
    assert eng.is_eog(EOS)
    res = eng.generate("x", max_tokens=10)
    assert res.finish_reason == "eos" and res.text == "yz" and res.token_ids[-1] == EOS
    res = eng.generate("x", max_tokens=10, ignore_eos=True)
    assert res.finish_reason == "length" and res.text == "yz</s>xyz</s>xyz"
    res = eng.generate("x", max_tokens=10, stop_token_ids=[ord("z")])
    assert res.finish_reason == "stop" and res.text == "y"
    res = eng.generate("x", max_tokens=0)
    assert res.finish_reason == "length" and res.token_ids == [] and res.text == ""


def test_context_end_is_length():
    eng = cycle_engine("xyz")
    prompt = eng.tokenize("x") * (eng.max_context - 2)
    res = eng.generate(prompt, max_tokens=10)
    assert res.finish_reason == "length" and res.completion_tokens == 3


def test_chat_template_is_the_tokenizers_own(engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for gen_prompt in (True, False):
        assert engine.apply_chat_template(msgs, gen_prompt) == engine.tokenizer \
            .apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    assert engine.chat_template == CHAT_TEMPLATE
    # a chat turn is tokenized with its special tokens, BOS not doubled
    ids = engine.encode_prompt(engine.apply_chat_template(msgs[1:2]))
    assert ids.count(engine.bos_id) == 2 and ids[0] == engine.bos_id
    res = engine.chat(msgs[1:2], max_tokens=3, ignore_eos=True)
    assert res.prompt_tokens == len(ids)
    plain = TorchEngine(tiny_module(), byte_tokenizer(), name="plain")
    with pytest.raises(EngineError, match="plain has no chat template"):
        plain.apply_chat_template(msgs)
    with pytest.raises(EngineError, match="message 0 must be a mapping"):
        engine.apply_chat_template([{"role": "user"}])


def test_misuse_is_a_clear_error(engine):
    other = TorchEngine(tiny_module(), byte_tokenizer(), name="other")
    st = engine.new_state(capacity=4)
    with pytest.raises(EngineError, match="belongs to another engine"):
        other.decode(st, 1)
    with pytest.raises(EngineError, match="do not fit this state's capacity of 4"):
        engine.prefill(st, [1] * 5)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.prefill(st, [1, 10_000])
    with pytest.raises(EngineError, match="cannot rewind a state of 0 tokens to 2"):
        engine.rewind(st, 2)
    engine.release(st)
    engine.release(st)   # idempotent
    with pytest.raises(EngineError, match="was released"):
        engine.decode(st, 1)
    with pytest.raises(EngineError, match="capacity must be in"):
        engine.new_state(capacity=engine.max_context + 1)
    with pytest.raises(EngineError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(EngineError, match="do not fit the model's context"):
        engine.generate([1] * (engine.max_context + 1))
    gen = engine.start("Hi", max_tokens=1)
    gen.step()
    with pytest.raises(EngineError, match="has finished"):
        gen.step()


def test_the_opened_runnable_is_an_engine():
    with eq.open(tiny_model(add_bos=True)) as r:
        assert isinstance(r, Engine)
        res = r.generate("The capital of France is", max_tokens=4, ignore_eos=True)
        assert res.prompt_tokens == len("The capital of France is") + 1  # BOS added
        assert len(res.token_ids) == 4
