"""The chat page and arena of ``edgequant serve`` in headless Chromium, against the real server
(``create_app`` on a loopback port) with small real engines: the cycle engine (a transformers
forward pass whose greedy reply is known text, paced so that streaming can be watched and
stopped) and scripted engines whose replies are Markdown or an XSS payload.

Needs selenium and Debian's ``chromium`` and ``chromium-driver`` (see tests/browser.py); a
missing browser is a failure, not a skip.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("selenium.webdriver", reason="pip install selenium")

from edgequant.serve import ServedModel, create_app  # noqa: E402
from edgequant.serve.testing import running_server  # noqa: E402
from tests.browser import BrowserMissing, start_chromium  # noqa: E402

from ._engines import ScriptEngine, chat_cycle_engine, cycle_reply  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"
EVIL = f"Look: {XSS} and [click](javascript:alert(2)) and <script>alert(3)</script> done"
MARKDOWN = ("# Plan\n\nSome **bold** and *italic* text with `a_code <b>span</b>`.\n\n"
            "- first\n- second\n\n```\n<b>not bold</b>\n```\n\nSee https://example.com/docs.")
CYCLE_META = {"size_bytes": 1_500_000, "bits_per_weight": 4.5, "kld": 0.0123}
MD_META = {"size_bytes": 270_000_000, "bits_per_weight": 16.0, "kld": None}
WAIT = 60   # seconds any one wait may take on a loaded 2-core machine


def _served(id_: str, engine: Any, meta: dict[str, Any]) -> ServedModel:
    """A model opened by the server's loader, which fills in the card (backend …)."""
    return ServedModel(id_, loader=lambda: engine, meta=dict(meta))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    models = [_served("cycle", chat_cycle_engine("cycle", delay=0.02), CYCLE_META),
              _served("md", ScriptEngine(MARKDOWN, "md", delay=0.005), MD_META),
              _served("evil", ScriptEngine(EVIL, "evil"), {})]
    with running_server(create_app(models, parallel=4)) as url:
        yield url


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    try:
        drv = start_chromium((1280, 800))
    except BrowserMissing as e:
        pytest.fail(str(e))
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def page(driver: Any, server: str) -> Any:
    """The page at ``server`` with an empty localStorage, its models loaded."""
    driver.get(f"{server}/")
    driver.execute_script("localStorage.clear()")
    driver.get(f"{server}/")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    driver.get_log("browser")   # start each test with an empty console log
    return driver


# --- helpers ------------------------------------------------------------------------------

def _wait(driver: Any, cond: Any, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond)


def _by_id(driver: Any, id_: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _console_errors(driver: Any, allow: str | None = None) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and not (allow and re.search(allow, e.get("message", "")))]


def _settings(driver: Any, **values: Any) -> None:
    """Set sampler fields through the settings dialog."""
    _by_id(driver, "open-settings").click()
    for name, value in values.items():
        field = _by_id(driver, f"set-{name}")
        field.clear()
        field.send_keys(str(value))
    _by_id(driver, "close-settings").click()
    _wait(driver, lambda d: not _by_id(d, "settings").is_displayed())


def _pick(driver: Any, select_id: str, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_by_id(driver, select_id)).select_by_value(model)


def _idle(driver: Any) -> None:
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.busy") == "false")


def _say(driver: Any, text: str) -> None:
    """Type ``text`` and press Enter; wait for the answer to finish."""
    _by_id(driver, "prompt").send_keys(text + "\n")
    _wait(driver, lambda d: len(_css(d, "#messages .msg.assistant")) > 0)
    _idle(driver)


def _last_answer(driver: Any) -> Any:
    return _css(driver, "#messages .msg.assistant")[-1]


def _busy_slots(url: str) -> float:
    """Requests the server is generating now, from its Prometheus /metrics."""
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": "Bearer sekrit"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r"^edgequant_slots_busy(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert found, text
    return sum(float(v) for v in found)


def _observe(driver: Any, selector: str) -> None:
    """Record the text of the last ``selector`` after every DOM change (``window.__seen``)."""
    driver.execute_script(
        "window.__seen = [];"
        "new MutationObserver(() => { const all = document.querySelectorAll(arguments[0]);"
        "  if (all.length) window.__seen.push(all[all.length - 1].textContent); })"
        ".observe(document.body, {subtree: true, childList: true, characterData: true});",
        selector)


# --- tests --------------------------------------------------------------------------------

def test_models_are_listed_with_their_meta(page: Any) -> None:
    options = [o.get_attribute("value") for o in _css(page, "#model option")]
    assert options == ["cycle", "md", "evil"]
    _pick(page, "model", "cycle")
    meta = _by_id(page, "model-meta").text
    assert "torch" in meta and "1.50 MB" in meta and "4.50 bits/weight" in meta \
        and "KLD 0.0123" in meta, meta
    _pick(page, "model", "md")
    meta = _by_id(page, "model-meta").text
    assert "script" in meta and "270 MB" in meta and "16.00 bits/weight" in meta \
        and "KLD" not in meta, meta
    assert _console_errors(page) == []


def test_an_answer_streams_progressively_and_completely(page: Any) -> None:
    n = 40
    _settings(page, temperature=0, max_tokens=n)
    _pick(page, "model", "cycle")
    _observe(page, "#messages .msg.assistant .body")
    _say(page, "Hello there")
    answer = _last_answer(page)
    want = cycle_reply(n).strip()
    assert answer.find_element("css selector", ".body").text == want
    assert answer.get_attribute("data-state") == "done"
    seen = [s for s in page.execute_script("return window.__seen") if s]
    assert all(want.startswith(s) for s in seen), seen
    assert len(set(seen)) >= 3 and min(map(len, seen)) < len(want), seen   # it grew
    stats = answer.find_element("css selector", ".stats").text
    assert re.search(rf"TTFT \d+ ms · [\d.]+ tok/s · {n} tokens · length", stats), stats

    # Regenerate replaces the answer (same text: greedy), it does not add one
    _by_id(page, "regenerate").click()
    _wait(page, lambda d: _last_answer(d).get_attribute("data-state") == "streaming")
    _idle(page)
    bodies = [b.text for b in _css(page, "#messages .msg .body")]
    assert bodies == ["Hello there", want]
    assert _console_errors(page) == []


def test_markdown_is_rendered_as_elements(page: Any) -> None:
    _settings(page, temperature=0, max_tokens=500)
    _pick(page, "model", "md")
    _say(page, "markdown please")
    body = _last_answer(page).find_element("css selector", ".body")
    tags = page.execute_script(
        "return Array.from(arguments[0].querySelectorAll('*')).map(e => e.tagName)", body)
    assert tags.count("H3") == 1 and tags.count("STRONG") == 1 and tags.count("EM") == 1
    assert tags.count("LI") == 2 and tags.count("PRE") == 1 and "B" not in tags
    code = [c.text for c in body.find_elements("css selector", "code")]
    assert code == ["a_code <b>span</b>", "<b>not bold</b>"]
    links = body.find_elements("css selector", "a")
    assert [(a.get_attribute("href"), a.get_attribute("rel")) for a in links] == \
        [("https://example.com/docs", "noopener noreferrer")]
    assert _console_errors(page) == []


A = ' rel="noopener noreferrer" target="_blank"'
RENDERED = [   # Markdown → the HTML that markdown.js's DOM serializes to
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
    ("**b** *i* _i_ __b__", "<p><strong>b</strong> <em>i</em> <em>i</em> <strong>b</strong></p>"),
    ("**bold *and italic***", "<p><strong>bold <em>and italic</em></strong></p>"),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
    ("`**not bold** <b>`", "<p><code>**not bold** &lt;b&gt;</code></p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ("[x](https://a.example/c?d=1)", f'<p><a href="https://a.example/c?d=1"{A}>x</a></p>'),
    ("see https://x.example/a.", f'<p>see <a href="https://x.example/a"{A}>'
                                 "https://x.example/a</a>.</p>"),
    ("a\nb\n\nc", "<p>a<br>b</p><p>c</p>"),
    ("# T\n###### six\n####### seven", "<h3>T</h3><h6>six</h6><p>####### seven</p>"),
    ("- a\n- b\n  - c", "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul>"),
    ("3. a\n4. b", '<ol start="3"><li>a</li><li>b</li></ol>'),
    ("> q <i>", "<blockquote><p>q &lt;i&gt;</p></blockquote>"),
    ("x\n\n---\n\ny", "<p>x</p><hr><p>y</p>"),
    ("```py\nif a < b:\n    pass\n```\nafter",
     '<pre data-lang="py"><code class="language-py">if a &lt; b:\n    pass</code></pre>'
     "<p>after</p>"),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ('```"><img src=x>\ncode\n```', "<pre><code>code</code></pre>"),
]
HOSTILE = ['[a](http://x.example/"onmouseover="alert(1))', "<a href=javascript:alert(1)>x</a>",
           "[**x**](https://ok.example) [y](data:text/html,<script>alert(1)</script>)",
           "```js onload=alert(1)\n</code></pre><img src=x onerror=alert(1)>\n```",
           "<svg/onload=alert(1)> &lt;b&gt; &amp; \u202e <!-- c --> <![CDATA[x]]>",
           "* * *\n- [x](vbscript:msgbox(1))\n1) `a` _b_ **c**\n> > nested <iframe>"]


def test_the_markdown_renderer_makes_only_safe_elements(page: Any) -> None:
    """markdown.js in the page: exact output for each construct, and for hostile input only
    the renderer's own tags, no event handler, no link but http(s)."""
    inputs = [md for md, _ in RENDERED] + HOSTILE
    result = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/static/markdown.js').then(m => done(arguments[0].map(t => {"
        "  const div = document.createElement('div'); m.renderMarkdown(t, div);"
        "  const els = Array.from(div.querySelectorAll('*'));"
        "  return [div.innerHTML, els.map(e => [e.tagName,"
        "    Array.from(e.attributes).map(a => [a.name, a.value])])]; })),"
        "  e => done(String(e)));", inputs)
    assert isinstance(result, list), result
    for (md, want), (html, _) in zip(RENDERED, result, strict=False):
        assert html == want, md
    allowed = {"P", "BR", "STRONG", "EM", "CODE", "PRE", "A", "UL", "OL", "LI", "H3", "H4",
               "H5", "H6", "BLOCKQUOTE", "HR"}
    for md, (_, elements) in zip(inputs, result, strict=True):
        for tag, attrs in elements:
            assert tag in allowed, (md, tag)
            for name, value in attrs:
                assert name in {"href", "rel", "target", "class", "data-lang", "start"}, md
                if name == "href":
                    assert value.startswith(("https://", "http://")), (md, value)
                    assert '"' not in value and " " not in value, (md, value)
    assert _console_errors(page) == []


def test_stop_ends_a_long_generation_and_frees_the_slot(page: Any, server: str) -> None:
    _settings(page, temperature=0, max_tokens=900)        # ~20 s of paced tokens
    _pick(page, "model", "cycle")
    _by_id(page, "prompt").send_keys("Go on and on\n")
    _wait(page, lambda d: len(_last_answer(d).text) > 20)
    assert _busy_slots(server) == 1
    _by_id(page, "stop").click()
    _idle(page)
    answer = _last_answer(page)
    assert answer.get_attribute("data-state") == "stopped"
    text = answer.find_element("css selector", ".body").text
    assert 0 < len(text) < 900 and cycle_reply(900).strip().startswith(text)
    assert "stopped" in answer.find_element("css selector", ".stats").text
    _wait(page, lambda d: _busy_slots(server) == 0, timeout=10)   # the server cancelled it
    assert _by_id(page, "send").is_displayed() and not _by_id(page, "stop").is_displayed()
    assert _console_errors(page) == []


def test_the_arena_streams_two_models_side_by_side(page: Any) -> None:
    _settings(page, temperature=0, max_tokens=40)
    _by_id(page, "tab-arena").click()
    assert _by_id(page, "arena-view").is_displayed()
    assert not _by_id(page, "chat-view").is_displayed()
    _pick(page, "model-left", "cycle")
    _pick(page, "model-right", "md")
    assert "KLD 0.0123" in _by_id(page, "meta-left").text
    assert "4.50 bits/weight" in _by_id(page, "meta-left").text
    assert "270 MB" in _by_id(page, "meta-right").text
    _observe(page, "#out-left")
    _by_id(page, "arena-prompt").send_keys("Which is better?\n")
    _wait(page, lambda d: _by_id(d, "panel-left").get_attribute("data-state") == "streaming")
    _idle(page)
    assert _by_id(page, "arena-question").text == "Which is better?"
    for side in ("left", "right"):
        assert _by_id(page, f"panel-{side}").get_attribute("data-state") == "done"
        assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s", _by_id(page, f"stats-{side}").text)
    assert _by_id(page, "out-left").text == cycle_reply(40).strip()
    right = _by_id(page, "out-right")
    assert right.find_element("css selector", "h3").text == "Plan"   # md, cut at 40 tokens
    assert len({s for s in page.execute_script("return window.__seen") if s}) >= 3
    assert _console_errors(page) == []


def test_arena_stop_stops_both(page: Any, server: str) -> None:
    _settings(page, temperature=0, max_tokens=900)
    _by_id(page, "tab-arena").click()
    _pick(page, "model-left", "cycle")
    _pick(page, "model-right", "cycle")
    _by_id(page, "arena-prompt").send_keys("Race\n")
    _wait(page, lambda d: min(len(_by_id(d, "out-left").text),
                              len(_by_id(d, "out-right").text)) > 10)
    assert _busy_slots(server) == 2
    _by_id(page, "arena-stop").click()
    _idle(page)
    for side in ("left", "right"):
        assert _by_id(page, f"panel-{side}").get_attribute("data-state") == "stopped"
    _wait(page, lambda d: _busy_slots(server) == 0, timeout=10)
    assert _console_errors(page) == []


def test_model_output_is_never_html(page: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    _settings(page, temperature=0, max_tokens=200)
    _pick(page, "model", "evil")
    _say(page, f"Say {XSS} back")
    box = _by_id(page, "messages")
    assert _css(page, "#messages img, #messages script, #messages a") == []
    assert _css(page, "img") == [] and len(_css(page, "script")) == 1   # chat.js only
    answer = _last_answer(page).find_element("css selector", ".body").text
    assert answer == EVIL
    assert f"Say {XSS} back" in box.text
    assert _css(page, ".conv[aria-current='true']")[0].text == f"Say {XSS} back"
    page.refresh()                                  # rendered again from localStorage
    _wait(page, lambda d: len(_css(d, "#messages .msg")) == 2)
    assert _css(page, "#messages img, #messages script, #messages a") == []
    with pytest.raises(NoAlertPresentException):
        _ = page.switch_to.alert.text
    assert _console_errors(page) == []


def test_conversations_survive_a_reload(page: Any) -> None:
    _settings(page, temperature=0, max_tokens=12)
    _pick(page, "model", "cycle")
    _say(page, "first chat")
    _by_id(page, "new-chat").click()
    _pick(page, "model", "md")
    _say(page, "second chat")
    page.refresh()
    _wait(page, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    titles = [b.text for b in _css(page, ".conv")]
    assert titles == ["second chat", "first chat"]
    assert _css(page, ".conv[aria-current='true']")[0].text == "second chat"
    assert _by_id(page, "model").get_attribute("value") == "md"
    _css(page, ".conv")[1].click()
    bodies = [b.text for b in _css(page, "#messages .msg .body")]
    assert bodies == ["first chat", cycle_reply(12).strip()]
    assert _by_id(page, "model").get_attribute("value") == "cycle"
    assert _by_id(page, "set-temperature").get_attribute("value") == "0"   # settings kept
    _css(page, ".del")[0].click()                                           # "second chat"
    assert [b.text for b in _css(page, ".conv")] == ["first chat"]
    page.refresh()
    _wait(page, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    assert [b.text for b in _css(page, ".conv")] == ["first chat"]
    assert _console_errors(page) == []


def test_a_phone_screen_has_no_sideways_scrolling(page: Any) -> None:
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        _settings(page, temperature=0, max_tokens=500)
        _pick(page, "model", "md")
        _say(page, "x" * 300 + " https://example.com/" + "a" * 200)
        assert page.execute_script(
            "return document.documentElement.scrollWidth") <= 390
        assert not _by_id(page, "sidebar").is_displayed() or \
            _by_id(page, "sidebar").rect["x"] < 0
        _by_id(page, "toggle-sidebar").click()
        _wait(page, lambda d: _by_id(d, "sidebar").rect["x"] >= 0)
        _css(page, ".conv")[0].click()                 # picking one closes the drawer
        assert _by_id(page, "prompt").is_displayed() and _by_id(page, "send").is_displayed()
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert _console_errors(page) == []


def _hold_a_slot(url: str, model: str, max_tokens: int) -> Any:
    """A streamed request that holds one of the server's slots until it is closed."""
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sekrit"},
        data=json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": "hold"}]}).encode())
    resp = urllib.request.urlopen(req, timeout=WAIT)
    assert resp.readline().startswith(b"data:")
    return resp


def test_a_key_is_asked_for_and_busy_is_shown(driver: Any) -> None:
    """401: the page asks for the key and then works; 503 (queue full): "busy", and Retry
    succeeds once the slot is free."""
    models = [_served("cycle", chat_cycle_engine("cycle", delay=0.02), CYCLE_META)]
    app = create_app(models, api_key="sekrit", parallel=1, max_queue=0)
    with running_server(app) as url:
        driver.get(f"{url}/")
        driver.execute_script("localStorage.clear()")
        driver.get(f"{url}/")
        _wait(driver, lambda d: _by_id(d, "key-form").is_displayed())
        assert "API key" in _by_id(driver, "banner").text
        _by_id(driver, "key-input").send_keys("sekrit\n")
        _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
        assert not _by_id(driver, "banner").is_displayed()
        assert driver.execute_script("return localStorage.getItem('edgequant.apiKey')") \
            == '"sekrit"'
        _settings(driver, temperature=0, max_tokens=12)

        held = _hold_a_slot(url, "cycle", 900)
        try:
            _by_id(driver, "prompt").send_keys("are you there?\n")
            _wait(driver, lambda d: _by_id(d, "banner").is_displayed())
            assert "busy" in _by_id(driver, "banner").text
            assert _css(driver, "#messages .msg.assistant") == []   # no empty answer kept
        finally:
            held.close()
        _wait(driver, lambda d: _busy_slots(url) == 0, timeout=10)
        _by_id(driver, "banner-retry").click()
        _wait(driver, lambda d: len(_css(d, "#messages .msg.assistant")) == 1)
        _idle(driver)
        assert _last_answer(driver).find_element("css selector", ".body").text == \
            cycle_reply(12).strip()
        # the browser reports the 401 and 503 responses themselves; nothing else
        assert _console_errors(driver, allow=r"status of (401|503)") == []
