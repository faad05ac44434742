// The chat page and arena of `edgequant serve`: plain ES2020, no build step, nothing fetched
// from anywhere but the server that served the page.
//
// Model text and user text only ever reach the page through textContent or markdown.js
// (which builds DOM nodes and never parses HTML); the page's CSP forbids inline script too.
// Conversations, settings and the API key are kept in this browser's localStorage.

import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

const KEY = {
  convs: "edgequant.conversations",
  current: "edgequant.current",
  settings: "edgequant.settings",
  apiKey: "edgequant.apiKey",
  model: "edgequant.model",
  arena: "edgequant.arena",
};
const DEFAULTS = { system: "", temperature: 0.7, top_p: 0.95, top_k: 40, max_tokens: 512, seed: null };
const FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

// --- storage ------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (err) {
    showBanner(`This browser did not keep the change (${err.message}).`);
  }
}

let settings = { ...DEFAULTS, ...load(KEY.settings, {}) };
let convs = loadConvs();
let currentId = load(KEY.current, null);
let models = [];
let chatCtrl = null; // the AbortController of the running chat request
let arenaCtrl = null;
const bodies = new WeakMap(); // message → its rendered body element

/** The stored conversations; an answer cut off by a reload counts as stopped. */
function loadConvs() {
  const list = load(KEY.convs, []);
  if (!Array.isArray(list)) return [];
  for (const conv of list) {
    for (const m of conv.messages || []) if (m.state === "streaming") m.state = "stopped";
  }
  return list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
}

function persist() {
  save(KEY.convs, convs);
  save(KEY.current, currentId);
}

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  try {
    const body = await resp.json();
    const detail = body && (body.error ? body.error.message : body.detail || body.status);
    if (typeof detail === "string" && detail) message = detail;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, message, resp.headers.get("Retry-After"));
}

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  const key = load(KEY.apiKey, "");
  if (key) headers.Authorization = `Bearer ${key}`;
  if (init.body) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...init, headers });
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

function samplingBody() {
  const body = {};
  for (const name of FIELDS) {
    const v = settings[name];
    if (typeof v === "number" && Number.isFinite(v)) body[name] = v;
  }
  if (body.top_k === 0) delete body.top_k;
  return body;
}

function withSystem(messages) {
  const system = (settings.system || "").trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

/**
 * Stream one chat completion: `onText(textSoFar)` after each delta. Resolves with the text
 * and its statistics, also when stopped through `signal` (finish "stopped"); rejects with an
 * ApiError (its `partial` holds the text so far) on any other failure.
 */
async function streamChat(model, messages, signal, onText) {
  const t0 = performance.now();
  const out = { text: "", finish: null, timings: null, usage: null, chunks: 0, first: null, last: null };
  const body = { model, messages, stream: true, stream_options: { include_usage: true },
    ...samplingBody() };
  let reader = null;
  const dispatch = (payload) => {
    if (payload === "[DONE]") return true;
    const chunk = JSON.parse(payload);
    if (chunk.error) throw new ApiError(0, chunk.error.message || "the server failed");
    const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : undefined;
    const piece = choice && choice.delta ? choice.delta.content : null;
    if (typeof piece === "string" && piece) {
      const now = performance.now();
      if (out.first === null) out.first = now;
      out.last = now;
      out.chunks += 1;
      out.text += piece;
      onText(out.text);
    }
    if (choice && choice.finish_reason) out.finish = choice.finish_reason;
    const timings = chunk.timings || (choice && choice.timings);
    if (timings) out.timings = timings;
    if (chunk.usage) out.usage = chunk.usage;
    return false;
  };
  try {
    const resp = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
    reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let data = [];
    let done = false;
    while (!done) {
      const next = await reader.read();
      if (next.done) {
        if (data.length) dispatch(data.join("\n"));
        break;
      }
      buf += next.value;
      let nl;
      while (!done && (nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "") {
          if (data.length) done = dispatch(data.join("\n"));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        } // event:, id:, retry: and ":" comments carry nothing the page needs
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      out.finish = "stopped";
    } else {
      const wrapped = err instanceof ApiError ? err : new ApiError(0, `could not reach the server (${err.message})`);
      wrapped.partial = out.text;
      throw wrapped;
    }
  } finally {
    if (reader) reader.cancel().catch(() => {});
  }
  return { text: out.text, ...statsOf(out, t0) };
}

function num(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/** TTFT and tokens/s: the server's `timings` when it sent them, else measured here. */
function statsOf(out, t0) {
  const t = out.timings || {};
  let ttftMs = num(t.ttft_ms);
  let tokPerS = num(t.predicted_per_second);
  const tokens = num(t.predicted_n) ?? num(out.usage && out.usage.completion_tokens) ?? out.chunks;
  const measured = ttftMs === null || tokPerS === null;
  if (ttftMs === null && out.first !== null) ttftMs = out.first - t0;
  if (tokPerS === null && out.chunks > 1 && out.last > out.first) {
    tokPerS = (out.chunks - 1) / ((out.last - out.first) / 1000);
  }
  return { ttftMs, tokPerS, tokens, finish: out.finish, measured };
}

function formatStats(s) {
  if (!s) return "";
  const parts = [];
  if (s.ttftMs !== null && s.ttftMs !== undefined) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
  if (s.tokPerS !== null && s.tokPerS !== undefined) parts.push(`${s.tokPerS.toFixed(1)} tok/s`);
  if (s.tokens) parts.push(`${s.tokens} tokens`);
  if (s.finish) parts.push(s.finish);
  if (s.measured && parts.length) parts.push("(timed in the browser)");
  return parts.join(" · ");
}

// --- models -------------------------------------------------------------------------------

function megabytes(bytes) {
  const mb = bytes / 1e6;
  return `${mb < 10 ? mb.toFixed(2) : mb < 100 ? mb.toFixed(1) : Math.round(mb)} MB`;
}

function describe(meta) {
  if (!meta) return "";
  const parts = [];
  if (meta.backend) parts.push(meta.backend);
  if (num(meta.size_bytes) !== null) parts.push(megabytes(meta.size_bytes));
  if (num(meta.bits_per_weight) !== null) parts.push(`${meta.bits_per_weight.toFixed(2)} bits/weight`);
  if (num(meta.kld) !== null) parts.push(`KLD ${meta.kld.toPrecision(3)}`);
  if (num(meta.ppl) !== null) parts.push(`PPL ${meta.ppl.toFixed(2)}`);
  const how = [meta.method, meta.scheme].filter((x) => typeof x === "string" && x).join(" ");
  if (how) parts.push(how);
  return parts.join(" · ");
}

function metaOf(id) {
  const m = models.find((x) => x.id === id);
  return m ? m.meta : null;
}

function fillPicker(select, wanted) {
  select.replaceChildren(...models.map((m) => {
    const opt = document.createElement("option");
    opt.value = m.id;
    const meta = m.meta || {};
    const size = num(meta.size_bytes) !== null ? ` · ${megabytes(meta.size_bytes)}` : "";
    opt.textContent = `${m.id}${size}`;
    return opt;
  }));
  if (models.some((m) => m.id === wanted)) select.value = wanted;
}

function showMeta() {
  $("model-meta").textContent = describe(metaOf($("model").value));
  for (const side of ["left", "right"]) {
    $(`meta-${side}`).textContent = describe(metaOf($(`model-${side}`).value));
  }
}

async function loadModels() {
  try {
    const body = await (await api("v1/models")).json();
    models = Array.isArray(body.data) ? body.data.filter((m) => m && typeof m.id === "string") : [];
  } catch (err) {
    if (err.status === 503) {
      showBanner("The server is still loading its models…");
      setTimeout(loadModels, 2000);
    } else {
      handleError(err, loadModels);
    }
    return;
  }
  const conv = currentConv();
  fillPicker($("model"), (conv && conv.model) || load(KEY.model, null));
  const arena = load(KEY.arena, {});
  fillPicker($("model-left"), arena.left);
  fillPicker($("model-right"), arena.right || (models[1] && models[1].id));
  showMeta();
  renderMessages();
  if (!models.length) showBanner("The server serves no model.");
  else if ($("banner").dataset.kind === "loading") hideBanner();
  document.body.dataset.ready = "true";
}

// --- banner and API key -------------------------------------------------------------------

function showBanner(text, retry = null, kind = "error") {
  $("banner-text").textContent = text;
  $("banner").dataset.kind = kind;
  $("banner").hidden = false;
  const btn = $("banner-retry");
  btn.hidden = !retry;
  btn.onclick = retry ? () => { hideBanner(); retry(); } : null;
}

function hideBanner() {
  $("banner").hidden = true;
  $("banner").dataset.kind = "";
}

function handleError(err, retry) {
  if (err.status === 401) {
    showBanner(`The server needs an API key: ${err.message}`, null, "auth");
    $("key-form").hidden = false;
    $("key-input").focus();
  } else if (err.status === 503) {
    const wait = err.retryAfter ? ` in ${err.retryAfter} s` : " in a moment";
    showBanner(`The server is busy (${err.message}). Retry${wait}.`, retry, "busy");
  } else if (err.status) {
    showBanner(`Error ${err.status}: ${err.message}`);
  } else {
    showBanner(`Error: ${err.message}`);
  }
}

// --- conversations ------------------------------------------------------------------------

function currentConv() {
  return convs.find((c) => c.id === currentId) || null;
}

function newConv() {
  const conv = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
    title: "New chat", model: $("model").value, messages: [], updated: Date.now() };
  convs.unshift(conv);
  currentId = conv.id;
  persist();
  return conv;
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

function renderConvList() {
  const items = convs.map((c) => {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv";
    open.textContent = c.title;
    if (c.id === currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => switchTo(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon del";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete conversation: ${c.title}`);
    del.addEventListener("click", () => deleteConv(c.id));
    li.append(open, del);
    return li;
  });
  $("conv-list").replaceChildren(...items);
}

function messageNode(msg) {
  const art = document.createElement("article");
  art.className = `msg ${msg.role === "user" ? "user" : "assistant"}`;
  art.dataset.state = msg.state || "done";
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = msg.role === "user" ? "You" : msg.model || "assistant";
  const body = document.createElement("div");
  body.className = "body";
  if (msg.role === "user") body.textContent = msg.content;
  else renderMarkdown(msg.content, body);
  bodies.set(msg, body);
  art.append(who, body);
  if (msg.role !== "user") {
    const foot = document.createElement("p");
    foot.className = msg.error ? "stats error" : "stats";
    foot.textContent = msg.error ? `Error: ${msg.error}` : formatStats(msg.stats);
    art.append(foot);
  }
  return art;
}

function renderMessages() {
  const conv = currentConv();
  const list = conv ? conv.messages : [];
  const box = $("messages");
  box.replaceChildren(...list.map(messageNode));
  if (!list.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = models.length ? "Say something to the model." : "Pick a model and say something.";
    box.append(p);
  }
  box.scrollTop = box.scrollHeight;
  updateButtons();
}

function renderAll() {
  renderConvList();
  renderMessages();
}

function switchTo(id) {
  if (chatCtrl) return; // finish or stop the running answer first
  currentId = id;
  const conv = currentConv();
  if (conv && models.some((m) => m.id === conv.model)) {
    $("model").value = conv.model;
    showMeta();
  }
  persist();
  renderAll();
  document.body.classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

function deleteConv(id) {
  if (chatCtrl && id === currentId) return;
  convs = convs.filter((c) => c.id !== id);
  if (id === currentId) currentId = convs.length ? convs[0].id : null;
  persist();
  renderAll();
}

function updateButtons() {
  const busy = chatCtrl !== null;
  const conv = currentConv();
  const hasUser = !!conv && conv.messages.some((m) => m.role === "user");
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !hasUser;
  $("model").disabled = busy;
  $("new-chat").disabled = busy;
  $("messages").setAttribute("aria-busy", String(busy)); // screen readers: read it when done
  document.body.dataset.busy = String(busy || arenaCtrl !== null);
}

// --- chat ---------------------------------------------------------------------------------

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

/** Re-render a streaming message at most once a frame, keeping the view at the bottom. */
function painter(msg, box) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const body = bodies.get(msg);
      if (!body || !body.isConnected) return;
      const stick = nearBottom(box);
      renderMarkdown(msg.content, body);
      if (stick) box.scrollTop = box.scrollHeight;
    });
  };
}

async function generate(conv) {
  const model = $("model").value;
  if (!model) {
    showBanner("There is no model to talk to: the server lists none.");
    return;
  }
  hideBanner();
  conv.model = model;
  save(KEY.model, model);
  const history = withSystem(conv.messages
    .filter((m) => (m.role === "user" || m.role === "assistant") && m.content && !m.error)
    .map((m) => ({ role: m.role, content: m.content })));
  const reply = { role: "assistant", content: "", model, state: "streaming" };
  conv.messages.push(reply);
  conv.updated = Date.now();
  chatCtrl = new AbortController();
  persist();
  renderAll();
  const paint = painter(reply, $("messages"));
  try {
    const result = await streamChat(model, history, chatCtrl.signal, (text) => {
      reply.content = text;
      paint();
    });
    reply.content = result.text;
    reply.stats = { ttftMs: result.ttftMs, tokPerS: result.tokPerS, tokens: result.tokens,
      finish: result.finish, measured: result.measured };
    reply.state = result.finish === "stopped" ? "stopped" : "done";
  } catch (err) {
    reply.content = err.partial || reply.content;
    if (reply.content) {
      reply.error = err.message;
      reply.state = "error";
    } else {
      conv.messages.splice(conv.messages.indexOf(reply), 1);
    }
    handleError(err, () => regenerate());
  } finally {
    chatCtrl = null;
    conv.updated = Date.now();
    persist();
    renderAll();
  }
}

function send(text) {
  if (chatCtrl || !text.trim()) return;
  const conv = currentConv() || newConv();
  if (!conv.messages.length) conv.title = titleOf(text);
  conv.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  generate(conv);
}

function regenerate() {
  const conv = currentConv();
  if (chatCtrl || !conv) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role !== "user") {
    conv.messages.pop();
  }
  if (conv.messages.length) generate(conv);
}

// --- arena --------------------------------------------------------------------------------

async function arenaSend(text) {
  if (arenaCtrl || !text.trim()) return;
  hideBanner();
  save(KEY.arena, { left: $("model-left").value, right: $("model-right").value });
  arenaCtrl = new AbortController();
  $("arena-send").hidden = true;
  $("arena-stop").hidden = false;
  document.body.dataset.busy = "true";
  const question = $("arena-question");
  question.textContent = text;
  question.hidden = false;
  $("arena-prompt").value = "";
  const messages = withSystem([{ role: "user", content: text }]);
  const runs = ["left", "right"].map(async (side) => {
    const panel = $(`panel-${side}`);
    const out = $(`out-${side}`);
    const stats = $(`stats-${side}`);
    const model = $(`model-${side}`).value;
    const msg = { content: "" };
    bodies.set(msg, out);
    out.replaceChildren();
    stats.className = "stats";
    stats.textContent = "…";
    panel.dataset.state = "streaming";
    out.setAttribute("aria-busy", "true");
    const paint = painter(msg, out);
    try {
      const r = await streamChat(model, messages, arenaCtrl.signal, (t) => {
        msg.content = t;
        paint();
      });
      renderMarkdown(r.text, out);
      stats.textContent = formatStats(r);
      panel.dataset.state = r.finish === "stopped" ? "stopped" : "done";
    } catch (err) {
      renderMarkdown(err.partial || msg.content, out);
      stats.className = "stats error";
      stats.textContent = err.status === 503 ? `Busy: ${err.message}. Retry in a moment.`
        : `Error: ${err.message}`;
      panel.dataset.state = "error";
      if (err.status === 401) handleError(err);
    }
  });
  await Promise.allSettled(runs);
  for (const side of ["left", "right"]) $(`out-${side}`).setAttribute("aria-busy", "false");
  arenaCtrl = null;
  $("arena-send").hidden = false;
  $("arena-stop").hidden = true;
  updateButtons();
}

// --- settings -----------------------------------------------------------------------------

function fillSettings() {
  $("set-system").value = settings.system || "";
  for (const name of FIELDS) {
    const v = settings[name];
    $(`set-${name}`).value = v === null || v === undefined ? "" : String(v);
  }
  $("set-key").value = load(KEY.apiKey, "");
}

function readSettings() {
  settings.system = $("set-system").value;
  for (const name of FIELDS) {
    const raw = $(`set-${name}`).value.trim();
    const v = raw === "" ? null : Number(raw);
    settings[name] = v === null || Number.isFinite(v) ? v : settings[name];
  }
  save(KEY.settings, settings);
  save(KEY.apiKey, $("set-key").value.trim());
}

// --- tabs and layout ----------------------------------------------------------------------

function selectTab(name, focus = false) {
  for (const tab of ["chat", "arena"]) {
    const on = tab === name;
    const btn = $(`tab-${tab}`);
    btn.setAttribute("aria-selected", String(on));
    btn.tabIndex = on ? 0 : -1;
    $(`${tab}-view`).hidden = !on;
    if (on && focus) btn.focus();
  }
  document.body.dataset.view = name;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function enterSends(textarea, form) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send($("prompt").value);
  });
  $("arena-form").addEventListener("submit", (e) => {
    e.preventDefault();
    arenaSend($("arena-prompt").value);
  });
  enterSends($("prompt"), $("composer"));
  enterSends($("arena-prompt"), $("arena-form"));
  $("stop").addEventListener("click", () => chatCtrl && chatCtrl.abort());
  $("arena-stop").addEventListener("click", () => arenaCtrl && arenaCtrl.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", () => {
    if (chatCtrl) return;
    newConv();
    renderAll();
    $("prompt").focus();
  });
  for (const id of ["model", "model-left", "model-right"]) {
    $(id).addEventListener("change", () => {
      showMeta();
      if (id === "model") save(KEY.model, $("model").value);
      else save(KEY.arena, { left: $("model-left").value, right: $("model-right").value });
    });
  }
  $("banner-close").addEventListener("click", hideBanner);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    save(KEY.apiKey, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    hideBanner();
    loadModels();
  });
  $("open-settings").addEventListener("click", () => {
    fillSettings();
    $("settings").showModal();
  });
  $("settings-form").addEventListener("input", readSettings);
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    readSettings();
    $("settings").close();
  });
  $("reset-settings").addEventListener("click", () => {
    settings = { ...DEFAULTS };
    save(KEY.settings, settings);
    fillSettings();
  });
  const tabs = ["chat", "arena"];
  tabs.forEach((name, i) => {
    const btn = $(`tab-${name}`);
    btn.addEventListener("click", () => selectTab(name));
    btn.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length], true);
    });
  });
  $("toggle-sidebar").addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  window.addEventListener("storage", (e) => {
    // another tab changed the conversations: show them, unless this one is answering
    if (e.key === KEY.convs && !chatCtrl) {
      convs = loadConvs();
      renderAll();
    }
  });
}

wire();
fillSettings();
selectTab(location.hash === "#arena" ? "arena" : "chat");
if (!currentConv()) currentId = convs.length ? convs[0].id : null;
renderAll();
loadModels();
