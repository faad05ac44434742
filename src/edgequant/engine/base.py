"""The ``Engine``: what runs a model — prefill and decode on explicit KV state, sampling, stop
strings, streaming and the model's chat template.

An engine holds the weights; each sequence it computes lives in its own
:class:`EngineState` (a KV cache, or a sequence of a shared llama.cpp context), so one engine
serves several independent requests: a state is advanced with :meth:`Engine.prefill` /
:meth:`Engine.decode` (each returns the next-token logits row), rewound with
:meth:`Engine.rewind` and given back with :meth:`Engine.release`. On top of that,
:class:`Generation` is one request advanced a token at a time (what a server's slot holds)
and :meth:`Engine.generate` runs one to the end, streaming text deltas to a callback.

Several independent sequences decode together: :meth:`Engine.decode_batch` appends one
token to each of several states in one forward pass (a backend's batched pass; the default
loops), and :meth:`Engine.step_batch` advances several generations a token each with it —
continuous batching, as llama.cpp's server slots and vLLM do: a generation joins or leaves
the batch at any step, its prompt evaluated on its own.

Evaluation (``edgequant.eval``) measures speed and writes sample generations through this
interface only; the backends' evaluation ``Runnable`` classes extend an engine with scoring
(see :mod:`edgequant.backends.base`). An engine is used from one thread at a time.

No torch at import: a GGUF file runs with llama.cpp and numpy alone.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np

from .sampling import EngineError, FinishReason, SamplingParams, as_params, new_rng, sample
from .text import StopFilter, TextDecoder

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


class EngineState:
    """One sequence's KV state in its engine.

    Attributes:
        engine: the engine it belongs to (a state is never used with another).
        tokens: the ids the cache holds, in order (the engine keeps it; do not edit).
        capacity: the most tokens it may hold.
    """

    def __init__(self, engine: Engine, capacity: int) -> None:
        self.engine = engine
        self.tokens: list[int] = []
        self.capacity = capacity
        self.released = False

    def __len__(self) -> int:
        return len(self.tokens)

    def release(self) -> None:
        self.engine.release(self)

    def __enter__(self) -> EngineState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class GenerationResult:
    """One finished generation.

    Attributes:
        text: the new text (without an end-of-generation or stop token's text, cut before
            a stop string).
        token_ids: every sampled token, the one that ended generation included.
        finish_reason: ``"eos"`` (an end-of-generation token), ``"stop"`` (a stop string or
            stop token) or ``"length"`` (``max_tokens`` or the context's end).
        prompt_tokens, completion_tokens: the usage (``completion_tokens ==
            len(token_ids)``).
        prefill_s: the prompt's forward pass; decode_s: all decode steps together;
            ttft_s: from the start to the first token sampled; total_s: start to end.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        """The text: ``print(engine.generate(...))`` prints what the model said."""
        return self.text


class Engine(ABC):
    """A model that computes next-token logits on explicit states, and generates.

    Attributes:
        backend: ``"torch"`` | ``"llama.cpp"`` | …
        name: a short display name.
        bos_id: BOS (or EOS when the tokenizer has none).
        eos_id: end of sequence, or None.
        add_bos: whether the tokenizer adds BOS by default (a text prompt then gets it).
        vocab_size: width of a logits row.
        max_context: the longest sequence the model takes.
        threads: CPU threads it computes with.
    """

    backend: str
    name: str
    bos_id: int
    eos_id: int | None
    add_bos: bool
    vocab_size: int
    max_context: int
    threads: int

    # --- what a backend provides ----------------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``, no BOS added; ``special`` parses special-token text."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens rendered."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja2 source), or None."""

    @abstractmethod
    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        ...

    @abstractmethod
    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, end of turn …)."""

    @abstractmethod
    def new_state(self, capacity: int | None = None) -> EngineState:
        """An empty state for at most ``capacity`` tokens (None: the backend's default)."""

    @abstractmethod
    def _forward(self, state: EngineState, ids: Sequence[int], rows: int) -> np.ndarray:
        """Append ``ids`` to the state's cache; float32 logits ``(rows, V)`` of its last
        ``rows`` positions."""

    @abstractmethod
    def _rewind(self, state: EngineState, n: int) -> None:
        """Drop the cache past the first ``n`` tokens."""

    @abstractmethod
    def _release(self, state: EngineState) -> None:
        """Free what the state holds."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to free keeps it
        """Free the model (the default holds nothing to free)."""

    # --- states ---------------------------------------------------------------------------

    def forward(self, state: EngineState, ids: Sequence[int], rows: int = 1) -> np.ndarray:
        """Append ``ids`` to ``state``; the logits ``(rows, V)`` of its last ``rows`` new
        positions (``rows=len(ids)``: a row for each, what scoring needs)."""
        self._check_state(state)
        ids = [int(t) for t in ids]
        if not ids:
            raise EngineError("forward needs at least one token")
        if not 0 <= rows <= len(ids):
            raise EngineError(f"rows must be in [0, {len(ids)}] (the new tokens), got {rows}")
        if len(state.tokens) + len(ids) > state.capacity:
            raise EngineError(f"{len(state.tokens)} + {len(ids)} tokens do not fit this "
                              f"state's capacity of {state.capacity}; make the state with a "
                              "larger capacity, or shorten the prompt or max_tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"token ids {bad[:5]} are outside the vocabulary "
                              f"[0, {self.vocab_size})")
        out = self._forward(state, ids, rows)
        state.tokens.extend(ids)
        return out

    def prefill(self, state: EngineState, ids: Sequence[int]) -> np.ndarray:
        """Evaluate a prompt on ``state``; the next-token logits row ``(V,)``."""
        return self.forward(state, ids, 1)[0]

    def decode(self, state: EngineState, token: int) -> np.ndarray:
        """One decode step: append ``token``; the next-token logits row ``(V,)``."""
        return self.forward(state, [token], 1)[0]

    def decode_batch(self, states: Sequence[EngineState], tokens: Sequence[int]) -> np.ndarray:
        """One decode step of several sequences at once: append ``tokens[i]`` to
        ``states[i]``; the next-token logits ``(B, V)``, row ``i`` for ``states[i]``.

        The states are distinct, of this engine, live, and each has room for one more
        token. A backend computes them in one forward pass (the weights are read once for
        all rows, which is what makes serving several requests cheaper than serving them in
        turn); each state afterwards is as if it had decoded alone. The rows equal
        :meth:`decode`'s to float rounding (a batched matmul may sum in another order).
        On an error no state has advanced (where the backend can undo a partial pass).
        """
        states = list(states)
        toks = [int(t) for t in tokens]
        if len(states) != len(toks):
            raise EngineError(f"decode_batch got {len(states)} states but {len(toks)} tokens; "
                              "give one token per state")
        seen: set[int] = set()
        for i, (st, tok) in enumerate(zip(states, toks, strict=True)):
            if id(st) in seen:
                raise EngineError(f"state {i} appears twice in one decode_batch; a sequence "
                                  "takes one token per step")
            seen.add(id(st))
            self._check_state(st)
            if len(st.tokens) + 1 > st.capacity:
                raise EngineError(f"state {i} is full ({st.capacity} tokens, its capacity); "
                                  "make it with a larger capacity")
            if not 0 <= tok < self.vocab_size:
                raise EngineError(f"token id {tok} (state {i}) is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        if not states:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        out = self._decode_batch(states, toks)
        for st, tok in zip(states, toks, strict=True):
            st.tokens.append(tok)
        return out

    def _decode_batch(self, states: list[EngineState], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``states[i]``'s cache (``state.tokens`` is the caller's);
        logits ``(B, V)``. This default decodes them in turn; on an error the states already
        advanced are rewound (released, where the backend cannot rewind them)."""
        rows: list[np.ndarray] = []
        try:
            for st, tok in zip(states, tokens, strict=True):
                rows.append(self._forward(st, [tok], 1)[0])
        except BaseException:
            for st in states[:len(rows)]:
                try:
                    self._rewind(st, len(st.tokens))
                except EngineError:
                    self.release(st)
            raise
        return np.stack(rows)

    def rewind(self, state: EngineState, n: int) -> None:
        """Keep the first ``n`` tokens of ``state`` and drop the rest from its cache (shared
        prefixes: evaluate a prefix once, then each continuation after it)."""
        self._check_state(state)
        if not 0 <= n <= len(state.tokens):
            raise EngineError(f"cannot rewind a state of {len(state.tokens)} tokens to {n}")
        if n < len(state.tokens):
            self._rewind(state, n)
            del state.tokens[n:]

    def release(self, state: EngineState) -> None:
        """Give back what ``state`` holds; using it afterwards is an error. Idempotent."""
        if state.engine is not self:
            raise EngineError("this state belongs to another engine")
        if not state.released:
            state.released = True
            self._release(state)

    def _check_state(self, state: EngineState) -> None:
        if state.engine is not self:
            raise EngineError("this state belongs to another engine")
        if state.released:
            raise EngineError("this state was released; make a new one with new_state()")

    # --- prompts --------------------------------------------------------------------------

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True
                            ) -> str:
        """``messages`` (``[{"role": "user", "content": "…"}, …]``) as the prompt text the
        model was trained on, with the assistant's turn opened when
        ``add_generation_prompt``."""
        if self.chat_template is None:
            raise EngineError(f"{self.name} has no chat template; give a plain text prompt")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise EngineError(f"message {i} must be a mapping with string 'role' and "
                                  f"'content', got {m!r}")
            msgs.append(dict(m))
        return self._render_chat(msgs, add_generation_prompt)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text is tokenized with special tokens parsed (a chat
        template's markers) and BOS prepended when the tokenizer adds it and the text does
        not already start with it; ids are taken as they are."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, special=True)
            if self.add_bos and ids[:1] != [self.bos_id]:
                ids = [self.bos_id, *ids]
            return ids
        return [int(t) for t in prompt]

    # --- generation -----------------------------------------------------------------------

    def start(self, prompt: Prompt, params: SamplingParams | None = None,
              logprobs: int | None = None, **overrides: Any) -> Generation:
        """A :class:`Generation` of ``prompt``, not yet computed; advance it with ``step``.
        ``logprobs``: record each sampled token's log-probability and that many most likely
        alternatives (:attr:`Generation.token_logprobs`)."""
        return Generation(self, self.encode_prompt(prompt), as_params(params, overrides),
                          logprobs)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 on_text: Callable[[str], object] | None = None,
                 **overrides: Any) -> GenerationResult:
        """Generate from ``prompt`` (text or ids) to the end.

        Args:
            prompt: text (tokenized by :meth:`encode_prompt`) or token ids.
            params: sampling and stopping (default: greedy, 16 tokens); ``overrides``
                replace single fields (``max_tokens=64, temperature=0.7``).
            on_text: called with each new piece of text as soon as it is final (never a
                part of a stop string, never half a character).

        Example:
            >>> engine.generate("The capital of France is", max_tokens=16).text
        """
        gen = self.start(prompt, params, **overrides)
        try:
            while not gen.finished:
                delta = gen.step()
                if delta and on_text is not None:
                    on_text(delta)
        finally:
            gen.close()
        return gen.result()

    def step_batch(self, generations: Sequence[Generation]) -> list[str]:
        """Advance each active generation by one token; each one's text delta (what its
        :meth:`Generation.step` would have returned; '' for one not active).

        A generation whose prompt is not yet evaluated is prefilled on its own; all the
        others decode together in one :meth:`decode_batch`. The tokens, text, finish reason
        and timings' meaning are those of stepping each alone (each keeps its own sampling
        generator; its ``decode_s`` counts the batched pass it waited for).

        Errors stay with their generation: one whose step fails is closed with the
        exception in :attr:`Generation.error` (its delta is '') and the call goes on with
        the others. When the batched pass itself fails (it changes no state), each of its
        generations is stepped alone, so the failure lands on the ones that cause it. An
        interrupt (an exception that is not an ``Exception``) closes every generation of the
        call and propagates. Finished, failed and closed generations are skipped.
        """
        gens = list(generations)
        seen: set[int] = set()
        for i, g in enumerate(gens):
            if not isinstance(g, Generation) or g.engine is not self:
                raise EngineError(f"generation {i} is not a Generation of this engine")
            if id(g) in seen:
                raise EngineError(f"generation {i} appears twice in one step_batch")
            seen.add(id(g))
        deltas = [""] * len(gens)
        live = [i for i, g in enumerate(gens) if g.active]
        decoding = [i for i in live if gens[i].prefilled]
        try:
            for i in live:
                if not gens[i].prefilled:
                    deltas[i] = _kept(gens[i], gens[i].step)
            if decoding:
                states = [st for i in decoding if (st := gens[i].state) is not None]
                tokens = [gens[i].token_ids[-1] for i in decoding]
                t = time.perf_counter()
                try:
                    logits = self.decode_batch(states, tokens)
                except Exception:
                    for i in decoding:
                        deltas[i] = _kept(gens[i], gens[i].step)
                else:
                    dt = time.perf_counter() - t
                    for row, i in enumerate(decoding):
                        deltas[i] = _kept(gens[i], functools.partial(gens[i]._accept,
                                                                     logits[row], dt))
        except BaseException:
            for g in gens:
                g.close()
            raise
        return deltas

    def chat(self, messages: Messages, params: SamplingParams | None = None,
             on_text: Callable[[str], object] | None = None, **overrides: Any
             ) -> GenerationResult:
        """:meth:`generate` on ``messages`` in the model's chat template."""
        return self.generate(self.apply_chat_template(messages), params, on_text, **overrides)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Generation:
    """One request, advanced one token per :meth:`step` on its own state (or with others by
    :meth:`Engine.step_batch`).

    The cache never holds the last sampled token: it is decoded at the next step, so a
    finished generation did no wasted work. The state is released when it finishes (or on
    :meth:`close`, or when a step fails: :attr:`error` then holds the exception).
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 logprobs: int | None = None) -> None:
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
            raise EngineError(f"logprobs must be an integer in [0, 20] or None, got "
                              f"{logprobs!r}")
        if not prompt_ids:
            raise EngineError("the prompt is empty; give at least one token (BOS for none)")
        n = len(prompt_ids)
        if n > engine.max_context:
            raise EngineError(f"the prompt's {n} tokens do not fit the model's context of "
                              f"{engine.max_context}")
        self._t0 = time.perf_counter()
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.limit = min(params.max_tokens, engine.max_context - n + 1)
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.logprobs = logprobs
        #: per sampled token (when ``logprobs`` is set): ``{"id", "text", "logprob", "top"}``
        #: — ``text`` is what the token added to the text (the pieces of the tokens up to the
        #: end concatenate to the output before a stop string cuts it), ``logprob`` its
        #: log-probability under the model's distribution (before temperature, top-k and
        #: top-p, as OpenAI and vLLM report it), ``top`` the ``logprobs`` most likely tokens
        #: as ``{"id", "text", "logprob"}``
        self.token_logprobs: list[dict[str, Any]] = []
        self.prefill_s = self.decode_s = self.ttft_s = 0.0
        self._total_s = 0.0
        self._rng = new_rng(params.seed) if not params.greedy else None
        self._decoder = TextDecoder(engine.detokenize, prompt_ids)
        self._stops = StopFilter(params.stop)
        self._stop_ids = frozenset(params.stop_token_ids)
        self.state: EngineState | None = None
        if self.limit <= 0:
            self._finish("length")
        else:
            self.state = engine.new_state(capacity=n + self.limit - 1)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def active(self) -> bool:
        """Whether it can step: not finished, failed or closed."""
        return self.state is not None

    @property
    def prefilled(self) -> bool:
        """Whether the prompt was evaluated (the next step decodes one token)."""
        return bool(self.token_ids)

    @property
    def text(self) -> str:
        """The text so far (what was streamed plus what is held back)."""
        return self._stops.text

    def step(self) -> str:
        """Sample one token; the text that became final with it ('' when none did)."""
        state = self.state
        if self.finished or state is None:
            raise EngineError("this generation has finished")
        try:
            t = time.perf_counter()
            if self.prefilled:
                logits = self.engine.decode(state, self.token_ids[-1])
            else:
                logits = self.engine.prefill(state, self.prompt_ids)
            return self._accept(logits, time.perf_counter() - t)
        except BaseException as e:
            self._fail(e)
            raise

    def _accept(self, logits: np.ndarray, seconds: float) -> str:
        """Take the next-token logits of the forward pass that fed this generation (its
        prompt, or its last token; ``seconds`` it took): sample, check the stops, and return
        the text delta. :meth:`step` and :meth:`Engine.step_batch` share it."""
        if self.prefilled:
            self.decode_s += seconds
        else:
            self.prefill_s = seconds
        tok = sample(logits, self.params, self._rng) if self._rng is not None \
            else int(np.argmax(logits))
        if not self.token_ids:
            self.ttft_s = time.perf_counter() - self._t0
        self.token_ids.append(tok)
        record = self._record(logits, tok) if self.logprobs is not None else None
        reason: FinishReason | None = None
        delta = ""
        if not self.params.ignore_eos and self.engine.is_eog(tok):
            reason = "eos"
        elif tok in self._stop_ids:
            reason = "stop"
        else:
            piece = self._decoder.push(tok)
            if record is not None:
                record["text"] = piece
            delta = self._stops.push(piece)
            if self._stops.stopped:
                return delta + self._finish("stop")
            if len(self.token_ids) >= self.limit:
                reason = "length"
        if reason is not None:
            # ended without a stop string: an unfinished character and a held tail are final
            rest = self._decoder.flush()
            if rest and self.token_logprobs:
                self.token_logprobs[-1]["text"] += rest
            delta += self._stops.push(rest)
            delta += self._stops.flush()
            reason = "stop" if self._stops.stopped else reason
        if reason is not None:
            self._finish(reason)
        return delta

    def _record(self, logits: np.ndarray, tok: int) -> dict[str, Any]:
        """The log-probability record of the sampled ``tok`` (appended, text filled later)."""
        x = np.asarray(logits, dtype=np.float64)
        m = float(x.max())
        lp = x - (m + float(np.log(np.exp(x - m).sum())))
        k = int(self.logprobs or 0)
        top = np.argpartition(-lp, k - 1)[:k] if 0 < k < lp.shape[0] else \
            np.arange(lp.shape[0]) if k else np.zeros(0, dtype=np.int64)
        top = top[np.lexsort((top, -lp[top]))]
        detok = self.engine.detokenize
        rec = {"id": tok, "text": "", "logprob": float(lp[tok]),
               "top": [{"id": int(i), "text": detok([int(i)]), "logprob": float(lp[i])}
                       for i in top]}
        self.token_logprobs.append(rec)
        return rec

    def _fail(self, error: BaseException) -> None:
        """A step failed: keep the error and give the state back (it may hold half a step)."""
        self.error = error
        self.close()

    def _finish(self, reason: FinishReason) -> str:
        self.finish_reason = reason
        self._total_s = time.perf_counter() - self._t0
        self.close()
        return ""

    def close(self) -> None:
        """Release the state (a generation given up before it finished stays unfinished)."""
        if self.state is not None:
            self.engine.release(self.state)
            self.state = None

    def result(self) -> GenerationResult:
        if self.finish_reason is None:
            raise EngineError("this generation has not finished; step() it to the end")
        return GenerationResult(self._stops.text, list(self.token_ids), self.finish_reason,
                                len(self.prompt_ids), len(self.token_ids), self.prefill_s,
                                self.decode_s, self.ttft_s, self._total_s)


def _kept(gen: Generation, step: Callable[[], str]) -> str:
    """``step()``'s delta; an ``Exception`` fails ``gen`` alone (kept in ``gen.error``)."""
    try:
        return step()
    except Exception as e:
        if gen.error is None:
            gen._fail(e)
        return ""
