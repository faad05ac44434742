"""The llama.cpp backend: a ``.gguf`` file run by llama-cpp-python, as a Runnable.

Two llama.cpp contexts serve two jobs, and at most one is alive at a time:

- ``logits`` mode (``logits_all=True``): a logits row for every position, for perplexity,
  KL divergence and task scoring;
- ``speed`` mode (``logits_all=False``): only the last position's logits, as llama.cpp runs
  when it generates — prefill and decode timings come from this mode only.

Tokenization uses a third, vocabulary-only handle (no weights). Greedy decoding evaluates one
token at a time on llama.cpp's own KV cache and takes the argmax of the last logits row.
Nothing here imports torch until ``logits`` is called, so a measuring subprocess for a GGUF
file holds llama.cpp's memory, not torch's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .base import RunnableBase

if TYPE_CHECKING:
    import torch


_PROBE = """\
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, verbose=False)
llm.eval([llm.token_bos() if llm.token_bos() >= 0 else 0] * 8)
print("ok")
"""
_PATCH_LOCK = threading.Lock()


def extra_bufts_supported(path: Path, file_type: str | None = None) -> bool:
    """Whether llama.cpp's extra buffer types (AMX kernels, weight repacking) run here.

    Some virtual machines advertise AMX in CPUID but fault on its instructions (SIGILL in
    ``tilezero``); a llama-cpp-python built with ``GGML_NATIVE`` then crashes on the first
    quantized matmul. This runs one tiny evaluation of ``path`` in a subprocess, once per
    (llama-cpp-python version, CPU flags, kernel, GGUF file type), and remembers the verdict
    in ``<cache>/llama-cpp-probe.json``. ``EDGEQUANT_LLAMA_EXTRA_BUFTS=0|1`` overrides it.
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
        res = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                             text=True, check=False, timeout=600)
        if res.returncode != 0 and res.returncode != -signal.SIGILL:
            return True  # some other failure: let the real load report it
        verdicts[key] = res.returncode == 0
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
    raw = json.dumps([_llama_cpp().__version__, platform.machine(), platform.release(), flags,
                      file_type])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _new_llama(lib: Any, path: Path, extra_bufts: bool, **kwargs: Any) -> Any:
    """``Llama(path, **kwargs)``, with ``use_extra_bufts`` off when asked.

    llama-cpp-python has no argument for it, so its default-params factory is wrapped for the
    duration of this one constructor call (under a lock) and restored right after.
    """
    if extra_bufts:
        return lib.Llama(str(path), **kwargs)
    low = lib.llama_cpp
    with _PATCH_LOCK:
        original = low.llama_model_default_params

        def params() -> Any:
            p = original()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params
        try:
            return lib.Llama(str(path), **kwargs)
        finally:
            low.llama_model_default_params = original


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelLoadError(f"llama-cpp-python is not importable ({e}); install "
                             "edgequant[llama], or run the file's weights in torch with "
                             "eq.open(eq.load(path))") from None
    return llama_cpp


class LlamaCppRunnable(RunnableBase):
    """A GGUF file behind the Runnable interface.

    Args:
        path: the ``.gguf`` file.
        threads: llama.cpp threads for prompt and generation (default: the CPUs this
            process may run on).
        n_ctx: context size of the logits-mode context (grown when a sequence needs more).
        n_batch: tokens per llama.cpp decode call.
        extra_bufts: use llama.cpp's extra buffer types (AMX, weight repacking); None: yes
            when :func:`extra_bufts_supported` finds they run on this machine.
    """

    backend = "llama.cpp"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 n_ctx: int = 1024, n_batch: int = 512, extra_bufts: bool | None = None
                 ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path} does not exist")
        self._lib = _llama_cpp()
        self.threads: int = threads or len(os.sched_getaffinity(0))
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._llm: Any = None
        self._mode: str | None = None
        self._sha256: str | None = None
        try:
            self._vocab = self._lib.Llama(str(self.path), vocab_only=True, n_ctx=16, n_batch=16,
                                          n_ubatch=16, verbose=False)
        except Exception as e:  # llama-cpp raises ValueError/RuntimeError on bad files
            raise ModelLoadError(f"llama.cpp cannot read {self.path}: {e}; the file is "
                                 "truncated, corrupt, or of an architecture it lacks") from None
        meta = self._vocab.metadata
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
        self._chat_template: str | None = meta.get("tokenizer.chat_template")

    # --- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self._vocab.detokenize(list(ids), special=True)).decode("utf-8", "replace")

    def tokenizer_fingerprint(self) -> str:
        from ..data.tokens import fingerprint

        return fingerprint(self.tokenize, self.bos_id)

    def chat_prompt(self, user_text: str) -> str | None:
        if not self._chat_template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        text = self._vocab._model.token_get_text
        fmt = Jinja2ChatFormatter(template=self._chat_template, bos_token=text(self.bos_id),
                                  eos_token=text(self.eos_id if self.eos_id is not None else
                                                 self.bos_id), add_generation_prompt=True)
        return str(fmt(messages=[{"role": "user", "content": user_text}]).prompt)

    # --- contexts -------------------------------------------------------------------------

    def _context(self, mode: str, n_tokens: int) -> Any:
        """The live context for ``mode`` holding ``n_tokens``; (re)created when needed."""
        self._check_length(n_tokens)
        if self._llm is not None and self._mode == mode and n_tokens <= self._llm.n_ctx():
            return self._llm
        self._free()
        n_ctx = max(self._n_ctx if mode == "logits" else 0, -(-n_tokens // 256) * 256)
        try:
            self._llm = _new_llama(
                self._lib, self.path, self.extra_bufts, n_ctx=n_ctx,
                n_batch=min(self._n_batch, n_ctx),
                n_ubatch=min(self._n_batch, n_ctx), n_threads=self.threads,
                n_threads_batch=self.threads, logits_all=(mode == "logits"), verbose=False)
        except Exception as e:
            raise ModelLoadError(f"llama.cpp cannot load {self.path}: {e}") from None
        self._mode = mode
        return self._llm

    def _last_argmax(self) -> int:
        import numpy as np

        row = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(self.vocab_size,))
        return int(row.argmax())

    # --- compute --------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        import numpy as np
        import torch

        llm = self._context("logits", len(token_ids))
        llm.reset()
        llm.eval(list(token_ids))
        return torch.from_numpy(np.array(llm.scores[:len(token_ids)], dtype=np.float32))

    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        """Each prefix evaluated once: after it, every branch is evaluated from the prefix's
        end (``n_tokens`` rewound to it; llama.cpp drops the KV cells past it)."""
        import numpy as np
        import torch

        out: list[list[torch.Tensor]] = []
        for (prefix, branches), keep in zip(trees, last, strict=True):
            p = len(prefix)
            llm = self._context("logits", p + max((len(b) for b in branches), default=0))
            llm.reset()
            if p:
                llm.eval(list(prefix))
            rows = []
            for b, k in zip(branches, keep, strict=True):
                llm.n_tokens = p
                if b:
                    llm.eval(list(b))
                n = p + len(b)
                rows.append(torch.from_numpy(np.array(llm.scores[n - k:n], dtype=np.float32)))
            out.append(rows)
        return out

    def _prefill(self, ids: Sequence[int]) -> int:
        self._llm.reset()
        self._llm.eval(list(ids))
        return self._last_argmax()

    def _step(self, token: int) -> int:
        self._llm.eval([token])
        return self._last_argmax()

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop_at_eos: bool = True) -> list[int]:
        mode = self._mode or "speed"
        self._context(mode, len(prompt_ids) + max_new_tokens)
        return super().generate(prompt_ids, max_new_tokens, stop_at_eos)

    def time_generation(self, prompt_ids: Sequence[int], new_tokens: int) -> tuple[float, float]:
        self._context("speed", len(prompt_ids) + new_tokens + 1)
        return super().time_generation(prompt_ids, new_tokens)

    # --- identity -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        if self._sha256 is None:
            from ..io_utils import sha256_file

            self._sha256 = sha256_file(self.path)
        return {"name": self.path.name, "path": str(self.path.resolve()), "sha256": self._sha256,
                "kind": "gguf", "file_type": self._vocab.metadata.get("general.file_type"),
                "llama_extra_bufts": self.extra_bufts,
                "weights_sha256": self._sha256}

    def size_info(self) -> dict[str, Any]:
        from ..eval.size import gguf_size_info

        return gguf_size_info(self.path)

    def reopen_spec(self, scratch: Path) -> str | None:
        return str(self.path.resolve())

    def reopen_options(self) -> dict[str, Any]:
        return {"extra_bufts": self.extra_bufts, "threads": self.threads}

    def _free(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm, self._mode = None, None

    def close(self) -> None:
        self._free()
        if getattr(self, "_vocab", None) is not None:
            self._vocab.close()
            self._vocab = None


def open_gguf(source: Any, threads: int | None = None, **options: Any) -> LlamaCppRunnable:
    """Open a ``.gguf`` file with llama.cpp."""
    if not (isinstance(source, str | os.PathLike) and Path(source).is_file()):
        raise ModelLoadError(f"the llama.cpp backend runs .gguf files; {source!r} is not one")
    return LlamaCppRunnable(source, threads=threads, **options)
