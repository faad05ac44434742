"""The server on the zoo's real SmolLM2: its GGUF through llama.cpp and its HF checkpoint
through torch, the chat template each backend renders, and the ``edgequant serve`` command
as a user starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

from edgequant.serve import create_app  # noqa: E402
from edgequant.serve.models import open_model  # noqa: E402
from edgequant.serve.testing import running_server, wait_healthy  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.llama]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome"},
     {"role": "user", "content": "And of Spain?"}],
]


def test_llama_cpp_renders_the_chat_template_as_transformers_does(gguf_path, smollm2_dir):
    """The GGUF's ``tokenizer.chat_template`` through llama.cpp's side and the checkpoint's
    template through transformers give the same prompt text and the same token ids."""
    gguf = open_model(str(gguf_path), ctx=512, parallel=1)
    hf = open_model(str(smollm2_dir), ctx=512, parallel=1)
    try:
        for msgs in CONVERSATIONS:
            a, b = gguf.apply_chat_template(msgs), hf.apply_chat_template(msgs)
            assert a == b
            assert a.endswith("<|im_start|>assistant\n")
            assert gguf.encode_prompt(a) == hf.encode_prompt(b)
    finally:
        gguf.close()
        hf.close()


def test_gguf_chat_through_the_openai_client(gguf_path):
    app = create_app({"smol": open_model(str(gguf_path), ctx=512, parallel=2)}, parallel=2,
                     ctx=512)
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        msgs = CONVERSATIONS[0]
        whole = c.chat.completions.create(model="smol", messages=msgs, max_tokens=24,
                                          temperature=0)
        text = whole.choices[0].message.content
        # (llama.cpp's Q4_1 file and the dequantized checkpoint nearly tie on the first token
        # here — "L" vs "The" — so the answer's wording is not asserted, only its integrity)
        assert text and whole.usage.completion_tokens == 24
        stream = c.chat.completions.create(model="smol", messages=msgs, max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream
                       if ch.choices) == text
        card = c.models.retrieve("smol")
        meta = card.model_extra["meta"]
        assert meta["backend"] == "llama.cpp" and meta["bits_per_weight"] > 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_serve_command(gguf_path, tmp_path):
    port = _free_port()
    env = {**os.environ, "EDGEQUANT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "edgequant.cli", "serve",
                             f"smol={gguf_path}", "--port", str(port), "--ctx", "512"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 300)
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       headers={"Authorization": "Bearer k"},
                       json={"model": "smol", "max_tokens": 8, "temperature": 0,
                             "messages": CONVERSATIONS[0]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert httpx.get(url + "/v1/models").status_code == 401
        page = httpx.get(url + "/")
        assert page.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err       # 130: ended by SIGINT, as a shell reports
    assert "Traceback" not in err
    assert f"serving smol at http://127.0.0.1:{port}" in err


def test_the_serve_command_fails_clearly_on_a_corrupt_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = subprocess.run([sys.executable, "-m", "edgequant.cli", "serve", str(bad), "--port",
                        str(_free_port())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "could not load broken.gguf" in r.stderr and "Traceback" not in r.stderr
