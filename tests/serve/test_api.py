"""The server through the official ``openai`` client (and raw HTTP where the client hides
the wire), on a loopback port, with small real engines: a tiny random Llama with a byte
tokenizer and a chat template, and the cycle engine whose greedy text is known."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from edgequant.engine.torch_engine import TorchEngine  # noqa: E402
from edgequant.serve import ServedModel, create_app  # noqa: E402
from edgequant.serve.testing import running_server  # noqa: E402

from ..engine._models import cycle_engine  # noqa: E402
from ..eval._tiny import byte_tokenizer, tiny_module  # noqa: E402

KEY = "sk-test-key"
CYCLE = "Helo, wrd!"          # distinct bytes: greedy continuation of "H" is "elo, wrd!Helo…"
CTX = 128


def tiny_chat_engine() -> TorchEngine:
    return TorchEngine(tiny_module(seed=3), byte_tokenizer(chat=True), name="tiny")


@pytest.fixture(scope="module")
def server():
    app = create_app({"tiny": tiny_chat_engine(), "cycle": cycle_engine(CYCLE)}, api_key=KEY,
                     parallel=2, max_queue=2, ctx=CTX, max_body_bytes=64 << 10)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(server + path, content=content, timeout=120,
                      headers={**headers, "Content-Type": "application/json"}, **kw)


def sse_events(server: str, path: str, body) -> list[str]:
    """The ``data:`` payloads of a streamed answer, in order."""
    out = []
    with httpx.stream("POST", server + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
            else:
                assert line == "", line
    return out


MSGS = [{"role": "user", "content": "Say something."}]


# --- answers ----------------------------------------------------------------------------------

def test_chat_non_streamed_shape_and_usage(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # prompt tokens counted by transformers' own chat rendering of the same messages
    expected = byte_tokenizer(chat=True).apply_chat_template(MSGS, add_generation_prompt=True,
                                                             tokenize=True)
    if hasattr(expected, "keys"):      # a BatchEncoding in transformers 5
        expected = expected["input_ids"]
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(expected) + 7


def test_completion_greedy_text_is_the_models(client):
    r = client.completions.create(model="cycle", prompt="H", max_tokens=12, temperature=0)
    assert r.choices[0].text == (CYCLE * 3)[1:13]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens == 12


def test_completion_takes_token_ids(client):
    r = client.completions.create(model="cycle", prompt=[ord("H")], max_tokens=4,
                                  temperature=0)
    assert r.choices[0].text == "elo,"


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(server, client):
    r = client.completions.create(model="cycle", prompt="H", max_tokens=30, temperature=0,
                                  stop=["wr"])
    assert r.choices[0].text == "elo, " and r.choices[0].finish_reason == "stop"
    events = sse_events(server, "/v1/completions", {"model": "cycle", "prompt": "H",
                                                    "max_tokens": 30, "temperature": 0,
                                                    "stop": ["wr"], "stream": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "elo, "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streaming_invariants_of_llama_servers_tests(server):
    """Role in the first chunk, one id, finish_reason only in the last choice chunk, a
    usage chunk with empty choices when asked, then [DONE]."""
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    last = chunks[-2]["choices"][0]
    assert last["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert "ttft_ms" in chunks[-2]["timings"]


def test_streamed_text_equals_non_streamed_at_temperature_0(client):
    for model in ("tiny", "cycle"):
        kw = dict(model=model, max_tokens=20, temperature=0)
        if model == "tiny":
            whole = client.chat.completions.create(messages=MSGS, **kw)
            stream = client.chat.completions.create(messages=MSGS, stream=True, **kw)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == whole.choices[0].message.content
        else:
            whole = client.completions.create(prompt="l", **kw)
            stream = client.completions.create(prompt="l", stream=True, **kw)
            text = "".join(c.choices[0].text for c in stream if c.choices)
            assert text == whole.choices[0].text


def test_same_seed_same_text_other_seed_other_text(client):
    def run(seed):
        return client.completions.create(model="tiny", prompt="Once", max_tokens=24,
                                         temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_concurrent_requests_never_mix_tokens(client):
    """Two slots generating at once give each request exactly what it gets alone."""
    prompts = ["H", "w", "o", ","]
    alone = [client.completions.create(model="cycle", prompt=p, max_tokens=15,
                                       temperature=0).choices[0].text for p in prompts]
    together: dict[int, str] = {}

    def go(i: int) -> None:
        together[i] = client.completions.create(model="cycle", prompt=prompts[i],
                                                max_tokens=15, temperature=0).choices[0].text
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(prompts))] == alone


# --- other routes -----------------------------------------------------------------------------

def test_models_health_tokenize_detokenize_metrics(server, client):
    assert {m.id for m in client.models.list()} == {"tiny", "cycle"}
    assert httpx.get(server + "/health").json() == {"status": "ok"}        # public
    ids = raw(server, "/tokenize", {"model": "cycle", "content": "Héllo"}).json()["tokens"]
    assert ids == list("Héllo".encode())
    back = raw(server, "/detokenize", {"model": "cycle", "tokens": ids}).json()["content"]
    assert back == "Héllo"
    m = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'edgequant_slots_total{model="cycle"} 2.0' in m
    assert "edgequant_generation_tokens_total" in m


# --- bad input: each is refused in OpenAI's shape, and the server keeps serving ----------------

@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": "5"}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": -1}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"model": "nope", "messages": MSGS}, 404, "model"),
    ("/v1/chat/completions", {"model": "../../etc/passwd", "messages": MSGS}, 404, "model"),
    ("/v1/completions", {"model": "cycle", "prompt": "x" * (CTX + 5)}, 400, "prompt"),
    ("/v1/completions", {"model": "cycle", "prompt": "H", "max_tokens": CTX}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "cycle", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "cycle", "prompt": "H", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "cycle", "prompt": [9999]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "cycle", "messages": MSGS}, 400, "messages"),
    ("/v1/completions", [1, 2], 400, None),
])
def test_bad_request_is_refused_and_service_continues(server, client, path, body, status,
                                                      param):
    r = raw(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["param"] == param
    ok = client.completions.create(model="cycle", prompt="H", max_tokens=3, temperature=0)
    assert ok.choices[0].text == "elo"


def test_context_overflow_says_how_much_fits(server):
    r = raw(server, "/v1/completions", {"model": "cycle", "prompt": "x" * (CTX + 5)})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert str(CTX) in r.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x"])
def test_missing_or_wrong_key_is_401_and_the_right_one_works(server, client, key):
    r = raw(server, "/v1/completions", {"model": "cycle", "prompt": "H"}, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    assert client.completions.create(model="cycle", prompt="H", max_tokens=2,
                                     temperature=0).choices[0].text == "el"


def test_body_over_the_limit_is_413(server):
    r = raw(server, "/v1/completions", {"model": "cycle", "prompt": "x" * (80 << 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _busy(server: str, model: str) -> float:
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(f'edgequant_slots_busy{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


def _wait(cond, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_disconnect_frees_its_slot(server):
    body = {"model": "cycle", "prompt": "H", "max_tokens": 100, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines)
        assert _wait(lambda: _busy(server, "cycle") == 1)
    # the connection is closed: the generation stops and its slot is free again
    assert _wait(lambda: _busy(server, "cycle") == 0)
    m = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'edgequant_request_cancelled_total{model="cycle"}' in m


def test_queue_full_is_503_with_retry_after_then_normal_service(server, client):
    """2 slots + 2 queue places: a fifth concurrent request is refused, not queued."""
    body = {"model": "cycle", "prompt": "H", "max_tokens": CTX - 2, "temperature": 0,
            "stream": True, "ignore_eos": True}
    streams = []
    try:
        for _ in range(4):
            cm = httpx.stream("POST", server + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"})
            r = cm.__enter__()
            assert r.status_code == 200
            streams.append(cm)
        r = raw(server, "/v1/completions", {"model": "cycle", "prompt": "H", "max_tokens": 2})
        assert r.status_code == 503
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    assert _wait(lambda: _busy(server, "cycle") == 0)
    assert client.completions.create(model="cycle", prompt="H", max_tokens=3,
                                     temperature=0).choices[0].text == "elo"


def test_health_is_503_while_loading_then_200():
    gate = threading.Event()

    def slow_loader():
        gate.wait(60)
        return cycle_engine(CYCLE)
    app = create_app([ServedModel("cycle", loader=slow_loader)])
    assert _run_until_healthy(app, gate) == ""


def _run_until_healthy(app, gate) -> str:
    """Start ``app``; check /health is 503 {"status": "loading"} and a request is 503, then
    let the model load and check /health turns 200 and the model answers."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        if not _wait(lambda: _get(url + "/health") is not None):
            return "never answered"
        r = httpx.get(url + "/health")
        if r.status_code != 503 or r.json() != {"status": "loading"}:
            return f"while loading: {r.status_code} {r.text}"
        r = httpx.post(url + "/v1/completions", json={"model": "cycle", "prompt": "H"})
        if r.status_code != 503:
            return f"request while loading: {r.status_code}"
        gate.set()
        if not _wait(lambda: httpx.get(url + "/health").status_code == 200):
            return "never healthy"
        r = httpx.post(url + "/v1/completions", json={"model": "cycle", "prompt": "H",
                                                       "max_tokens": 3, "temperature": 0})
        return "" if r.json()["choices"][0]["text"] == "elo" else r.text
    finally:
        srv.should_exit = True
        th.join(30)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


# --- log-probabilities ------------------------------------------------------------------------

def test_chat_logprob_tokens_spell_the_answer_and_match_the_model(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)   # greedy: the top one
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)


def test_first_token_logprob_is_torchs_log_softmax(client):
    """The completion's first log-probability against torch's own log_softmax of the same
    module on the same prompt (computed here, independently of the engine)."""
    import torch

    engine = tiny_chat_engine()
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=1, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    ids = torch.tensor([list(b"Once")])
    with torch.no_grad():
        lp = torch.log_softmax(engine.module(input_ids=ids).logits[0, -1].double(), -1)
    best = int(lp.argmax())
    got = r.choices[0].logprobs
    assert got.token_logprobs[0] == pytest.approx(float(lp[best]), abs=1e-4)
    assert got.text_offset == [0]


def test_completion_logprobs_stop_at_the_stop_string(client):
    r = client.completions.create(model="cycle", prompt="H", max_tokens=30, temperature=0,
                                  stop=["wr"], logprobs=1)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == "elo, "
    assert lp.text_offset == [0, 1, 2, 3, 4]
    assert len(lp.top_logprobs) == len(lp.tokens) == len(lp.token_logprobs)


def test_streamed_logprobs_spell_the_streamed_text(client):
    stream = client.completions.create(model="cycle", prompt="H", max_tokens=12,
                                       temperature=0, stop=["d!H"], logprobs=0, stream=True)
    text, tokens = "", []
    for c in stream:
        if c.choices:
            text += c.choices[0].text
            if c.choices[0].logprobs:
                tokens += c.choices[0].logprobs.tokens
    assert text == "elo, wr" and "".join(tokens) == text
