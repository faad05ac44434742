"""The llama.cpp engine: a ``.gguf`` file run by llama-cpp-python's low-level API.

States are *sequences of one context*: the engine holds one llama.cpp model and one context
whose unified KV cache (``kv_unified``) holds up to ``parallel`` sequences; a state is a
sequence id and the tokens it has in the cache, positions ``0 … len − 1``. Decoding a token
writes cells tagged with that sequence id only, rewinding removes the sequence's cells past a
position (``llama_memory_seq_rm``), and releasing removes them all. This is how
llama-server's parallel slots share one context, and what lets :meth:`~LlamaCppEngine.
decode_batch` step several sequences in one ``llama_decode`` (a token per sequence, each
with its own sequence id and position). The cells are shared: the tokens of all live
states together must fit ``n_ctx``.

The context is made when the first state needs it, sized for that state (``n_ctx`` at
least, rounded up to 256), and made again, larger, when a state needs more and no other
state is alive. A forward pass asks llama.cpp for logits of the wanted rows only: the last
one for generation, every row for scoring — one context serves both.

Tokenization uses a separate vocabulary-only handle (no weights), which also tells the
metadata (chat template, BOS/EOS) before any weight is read. Numpy only: no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .base import Engine, EngineState
from .sampling import EngineError

_PROBE = """\
import sys, llama_cpp as lib
from llama_cpp import _internals
mp = lib.llama_model_default_params()
mp.n_gpu_layers, mp.use_extra_bufts = 0, sys.argv[2] == "1"
model = _internals.LlamaModel(path_model=sys.argv[1], params=mp, verbose=False)
cp = lib.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 64, 64, 1, 1
ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
batch = _internals.LlamaBatch(n_tokens=8, embd=0, n_seq_max=1, verbose=False)
batch.set_batch([max(model.token_bos(), 0)] * 8, n_past=0, logits_all=False)
sys.exit(lib.llama_decode(ctx.ctx, batch.batch))
"""
CTX_STEP = 256


def extra_bufts_supported(path: Path, file_type: str | None = None) -> bool:
    """Whether llama.cpp's extra buffer types (AMX kernels, weight repacking) run here.

    Some virtual machines advertise AMX in CPUID but fault on its instructions (SIGILL in
    ``tilezero``, or SIGSEGV); a llama-cpp-python built with ``GGML_NATIVE`` then crashes on
    the first quantized matmul. This runs one tiny evaluation of ``path`` in a subprocess
    with them, and when that dies of a signal, one without them: they are off when only the
    second runs. The verdict is remembered in ``<cache>/llama-cpp-probe.json`` per
    (llama-cpp-python version, CPU flags, kernel, GGUF file type).
    ``EDGEQUANT_LLAMA_EXTRA_BUFTS=0|1`` overrides it.
    """
    env = os.environ.get("EDGEQUANT_LLAMA_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    key = _probe_key(file_type)
    root = Path(os.environ.get("EDGEQUANT_CACHE") or Path.home() / ".cache" / "edgequant")
    store = root.expanduser() / "llama-cpp-probe.json"
    try:
        verdicts = json.loads(store.read_text())
    except (OSError, ValueError):
        verdicts = {}
    if key not in verdicts:
        def probe(extra: bool) -> int:
            return subprocess.run([sys.executable, "-c", _PROBE, str(path), str(int(extra))],
                                  capture_output=True, check=False, timeout=600).returncode

        with_them = probe(True)
        if with_them > 0 or (with_them < 0 and probe(False) != 0):
            return True  # some other failure: let the real load report it
        verdicts[key] = with_them == 0
        from ..io_utils import atomic_file

        with atomic_file(store) as tmp:
            tmp.write_text(json.dumps(verdicts, indent=1))
    return bool(verdicts[key])


def _probe_key(file_type: str | None) -> str:
    import platform

    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    raw = json.dumps([llama_cpp_module().__version__, platform.machine(), platform.release(),
                      flags, file_type])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def llama_cpp_module() -> Any:
    """``llama_cpp``, or a :class:`ModelLoadError` saying how to get it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelLoadError(f"llama-cpp-python is not importable ({e}); install "
                             "edgequant[llama], or run the file's weights in torch with "
                             "eq.open(eq.load(path))") from None
    return llama_cpp


class LlamaState(EngineState):
    """A sequence id of the engine's context (valid for one context: ``epoch``)."""

    def __init__(self, engine: Engine, capacity: int, seq_id: int, epoch: int) -> None:
        super().__init__(engine, capacity)
        self.seq_id = seq_id
        self.epoch = epoch
        self._finalizer: Any = None


class LlamaCppEngine(Engine):
    """A GGUF file as an :class:`~edgequant.engine.Engine`.

    Args:
        path: the ``.gguf`` file.
        threads: llama.cpp threads for prompt and generation (default: the CPUs this
            process may run on).
        n_ctx: the context's smallest size in tokens, shared by all live states (it grows
            when one state needs more and no other is alive).
        n_batch: tokens per ``llama_decode`` call.
        parallel: most states alive at once (sequences of the context).
        extra_bufts: use llama.cpp's extra buffer types (AMX, weight repacking); None: yes
            when :func:`extra_bufts_supported` finds they run on this machine.
    """

    backend = "llama.cpp"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 n_ctx: int = 512, n_batch: int = 512, parallel: int = 4,
                 extra_bufts: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path} does not exist")
        self._lib = llama_cpp_module()
        self.threads: int = threads or len(os.sched_getaffinity(0))
        if n_ctx < 1 or n_batch < 1 or not 1 <= parallel <= 256:
            raise EngineError(f"n_ctx and n_batch must be ≥ 1 and parallel in [1, 256], got "
                              f"{n_ctx}, {n_batch}, {parallel}")
        self._n_ctx, self._n_batch, self._parallel = n_ctx, n_batch, parallel
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._epoch = 0
        self._free_seqs: list[int] = []
        self._live: dict[int, int] = {}     # seq id -> tokens it holds
        try:
            self._vocab = self._lib.Llama(str(self.path), vocab_only=True, n_ctx=16, n_batch=16,
                                          n_ubatch=16, verbose=False)
        except Exception as e:  # llama-cpp raises ValueError/RuntimeError on bad files
            raise ModelLoadError(f"llama.cpp cannot read {self.path}: {e}; the file is "
                                 "truncated, corrupt, or of an architecture it lacks") from None
        meta = self._vocab.metadata
        self.metadata: dict[str, str] = dict(meta)
        self.extra_bufts = extra_bufts if extra_bufts is not None else \
            extra_bufts_supported(self.path, meta.get("general.file_type"))
        arch = meta.get("general.architecture", "")
        bos, eos = self._vocab.token_bos(), self._vocab.token_eos()
        self.eos_id: int | None = eos if eos >= 0 else None
        if bos < 0 and eos < 0:
            raise ModelLoadError(f"{self.path} has neither a BOS nor an EOS token")
        self.bos_id: int = bos if bos >= 0 else eos
        self.add_bos: bool = bool(self._vocab._model.add_bos_token())
        self.vocab_size: int = int(self._vocab.n_vocab())
        self.max_context: int = int(meta.get(f"{arch}.context_length", 0)) or 1 << 20
        self.name = self.path.name
        self._chat_template: str | None = meta.get("tokenizer.chat_template") or None

    # --- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self._vocab.detokenize(list(ids), special=True)).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab._model.vocab, int(token)))

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The GGUF's ``tokenizer.chat_template`` rendered by llama-cpp-python's Jinja2
        formatter (a sandboxed environment, as transformers renders it)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        text = self._vocab._model.token_get_text
        eos = self.eos_id if self.eos_id is not None else self.bos_id
        fmt = Jinja2ChatFormatter(template=self._chat_template or "", bos_token=text(self.bos_id),
                                  eos_token=text(eos),
                                  add_generation_prompt=add_generation_prompt)
        return str(fmt(messages=messages).prompt)  # type: ignore[arg-type]

    # --- model and context ----------------------------------------------------------------

    def _load(self) -> None:
        """Read the weights (once, at the first state)."""
        if self._model is not None:
            return
        from llama_cpp import _internals

        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0                       # as llama_cpp.Llama: CPU unless asked
        params.load_mode = self._lib.LLAMA_LOAD_MODE_MMAP
        params.use_extra_bufts = bool(self.extra_bufts)
        try:
            self._model = _internals.LlamaModel(path_model=str(self.path), params=params,
                                                verbose=False)
        except Exception as e:
            raise ModelLoadError(f"llama.cpp cannot load {self.path}: {e}") from None

    def _make_context(self, n_ctx: int) -> None:
        """A fresh context of ``n_ctx`` cells; every earlier state becomes invalid."""
        from llama_cpp import _internals

        self._free_context()
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(self._n_batch, n_ctx)
        params.n_threads = params.n_threads_batch = self.threads
        params.n_seq_max = self._parallel
        params.kv_unified = True          # the sequences share the cells, as slots do
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama
        params.no_perf = False
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
            self._batch = _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1,
                                                verbose=False)
        except Exception as e:
            raise ModelLoadError(f"llama.cpp cannot make a context of {n_ctx} tokens for "
                                 f"{self.path}: {e}") from None
        self._epoch += 1
        self._free_seqs = list(range(self._parallel))
        self._live = {}

    @property
    def n_ctx(self) -> int:
        """The context's size now (0 before the first state)."""
        return int(self._ctx.n_ctx()) if self._ctx is not None else 0

    def new_state(self, capacity: int | None = None) -> LlamaState:
        """An empty sequence for ``capacity`` tokens (None: the context's size)."""
        self._load()
        cap = int(capacity) if capacity is not None else max(self.n_ctx, self._n_ctx)
        if not 0 < cap <= self.max_context:
            raise EngineError(f"a state's capacity must be in [1, {self.max_context}] (the "
                              f"model's context), got {cap}")
        if cap > self.n_ctx:
            if self._live:
                raise EngineError(
                    f"a state of {cap} tokens does not fit the context of {self.n_ctx} while "
                    f"{len(self._live)} other state(s) are alive; release them, or open the "
                    f"model with n_ctx={-(-cap // CTX_STEP) * CTX_STEP * (len(self._live) + 1)}")
            self._make_context(max(self._n_ctx, -(-cap // CTX_STEP) * CTX_STEP))
        if not self._free_seqs:
            raise EngineError(f"all {self._parallel} sequences of the context are in use; "
                              "release a state, or open the model with a larger parallel=")
        seq = self._free_seqs.pop(0)
        self._live[seq] = 0
        state = LlamaState(self, cap, seq, self._epoch)
        # a state dropped without release() still gives its cells back
        state._finalizer = weakref.finalize(state, self._drop_sequence, seq, self._epoch)
        return state

    def _forward(self, state: EngineState, ids: Sequence[int], rows: int) -> np.ndarray:
        st = self._own(state)
        self._check_room(len(ids))
        lib, batch = self._lib, self._batch.batch
        v, n0, first = self.vocab_size, len(state.tokens), len(ids) - rows
        out = np.empty((rows, v), dtype=np.float32)
        step = self._batch._n_tokens
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            wanted = 0
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = n0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = st.seq_id
                batch.logits[i] = start + i >= first
                wanted += start + i >= first
            batch.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ctx.ctx, batch)
            if rc != 0:
                self._rewind(state, n0)   # drop what part of the pass reached the cache
                raise EngineError(f"llama_decode failed ({rc}"
                                  f"{': no free KV cells' if rc == 1 else ''}) after "
                                  f"{n0 + start} tokens of this state")
            self._live[st.seq_id] = n0 + start + len(chunk)
            if wanted:
                got = np.ctypeslib.as_array(lib.llama_get_logits(self._ctx.ctx),
                                            shape=(wanted, v))
                lo = start + len(chunk) - wanted - first
                out[lo:lo + wanted] = got
        return out

    def _decode_batch(self, states: list[EngineState], tokens: list[int]) -> np.ndarray:
        """One ``llama_decode`` for all states, as llama-server's slots share a batch: token
        ``i`` carries state ``i``'s sequence id and next position and asks for its logits.
        (More states than the batch holds take one call per ``n_batch`` of them.)"""
        sts = [self._own(s) for s in states]
        self._check_room(len(sts))
        lib, batch = self._lib, self._batch.batch
        v = self.vocab_size
        out = np.empty((len(sts), v), dtype=np.float32)
        step = self._batch._n_tokens
        done: list[LlamaState] = []
        for start in range(0, len(sts), step):
            chunk = list(zip(sts[start:start + step], tokens[start:start + step], strict=True))
            for i, (st, tok) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = len(st.tokens)
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = st.seq_id
                batch.logits[i] = True
            batch.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ctx.ctx, batch)
            if rc != 0:
                for st in done + [st for st, _ in chunk]:   # no state keeps a part of this step
                    self._rewind(st, len(st.tokens))
                raise EngineError(f"llama_decode failed ({rc}"
                                  f"{': no free KV cells' if rc == 1 else ''}) in a batched "
                                  f"step of {len(sts)} sequences")
            for i, (st, _) in enumerate(chunk):
                self._live[st.seq_id] = len(st.tokens) + 1
                out[start + i] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx.ctx, i),
                                                       shape=(v,))
                done.append(st)
        return out

    def _check_room(self, n: int) -> None:
        """The shared context must have ``n`` free cells beside the live states' tokens."""
        used = sum(self._live.values())
        if used + n > self.n_ctx:
            raise EngineError(f"the context's {self.n_ctx} cells hold {used} tokens of live "
                              f"states; {n} more do not fit: release states, or open "
                              "the model with a larger n_ctx")

    def _rewind(self, state: EngineState, n: int) -> None:
        st = self._own(state)
        self._lib.llama_memory_seq_rm(self._ctx.memory, st.seq_id, n, -1)
        self._live[st.seq_id] = n

    def _release(self, state: EngineState) -> None:
        assert isinstance(state, LlamaState)
        state._finalizer()

    def _drop_sequence(self, seq: int, epoch: int) -> None:
        if epoch != self._epoch or self._ctx is None or seq not in self._live:
            return
        self._lib.llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)
        del self._live[seq]
        self._free_seqs.append(seq)
        self._free_seqs.sort()

    def _own(self, state: EngineState) -> LlamaState:
        assert isinstance(state, LlamaState)
        if state.epoch != self._epoch:
            raise EngineError("this state belongs to a context that was since replaced; make "
                              "a new one")
        return state

    def _free_context(self) -> None:
        if self._ctx is not None:
            self._batch.close()
            self._ctx.close()
            self._ctx = self._batch = None
            self._live, self._free_seqs = {}, []

    def close(self) -> None:
        self._free_context()
        if self._model is not None:
            self._model.close()
            self._model = None
        if getattr(self, "_vocab", None) is not None:
            self._vocab.close()
            self._vocab = None

