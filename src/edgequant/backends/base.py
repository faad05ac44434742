"""``Runnable``: anything evaluation can score, and :func:`open_runnable`, which makes one.

Every number edgequant reports comes from the same evaluation code calling this small
interface, whatever produced the model: a torch ``Model`` (original, zoo, HF folder, native
artifact) or a ``.gguf`` file run by llama.cpp.

A Runnable scores (logits of whole sequences, batched, with shared prefixes); it does not
generate. The real backends' Runnables *are* engines: :class:`~edgequant.backends.torch_native.
TorchRunnable` extends :class:`~edgequant.engine.torch_engine.TorchEngine` and
:class:`~edgequant.backends.llamacpp.LlamaCppRunnable` extends
:class:`~edgequant.engine.llamacpp_engine.LlamaCppEngine`, so one loaded model serves both
scoring and generation (speed, sample generations, serving) and ``eq.open`` returns an object
that is both.

This module imports no torch at load time, so a measuring subprocess for a GGUF file carries
only llama.cpp and numpy (see :mod:`edgequant.eval.memory`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from ..errors import EvaluationError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from ..engine.base import Engine


@runtime_checkable
class Runnable(Protocol):
    """What evaluation needs of a model.

    Attributes:
        backend: ``"torch"`` | ``"llama.cpp"`` | … (recorded in results).
        name: a short display name.
        bos_id: the token every perplexity window starts with (BOS, or EOS when the
            tokenizer has no BOS).
        eos_id: end of sequence (generation stops there), or None.
        add_bos: whether the tokenizer adds BOS by default (lm-eval prepends it to task
            requests exactly then).
        vocab_size: width of a logits row.
        max_context: the longest sequence ``logits`` accepts.
        threads: CPU threads the backend computes with.
    """

    backend: str
    name: str
    bos_id: int
    eos_id: int | None
    add_bos: bool
    vocab_size: int
    max_context: int
    threads: int

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``, no BOS added; ``special`` parses ``<|im_start|>``-style
        special tokens (chat prompts), otherwise they are plain text."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``(T, V)`` float32 on CPU for one sequence (one window)."""
        ...

    def logits_batch(self, seqs: Sequence[Sequence[int]],
                     last: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``logits`` for several sequences; item ``i`` has ``len(seqs[i])`` rows exactly, or
        only its last ``last[i]`` rows (what scoring a continuation needs: a backend may then
        skip the output projection for the other positions)."""
        ...

    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        """For each ``(prefix, branches)``: the last ``last[i][j]`` rows of ``logits(prefix +
        branches[j])`` — what scoring the choices of one multiple-choice item needs. A
        backend may compute each prefix once (the torch backend does)."""
        ...

    def tokenizer_fingerprint(self) -> str: ...

    def identity(self) -> dict[str, Any]:
        """What the weights are: ``name``, ``path``, ``sha256``, ``kind``, recipe …"""
        ...

    def size_info(self) -> dict[str, Any]:
        """``size_bytes``, ``bits_per_weight``, ``bits_per_weight_total``, ``num_params``."""
        ...

    def reopen_spec(self, scratch: Path) -> str | None:
        """A source that :func:`open_runnable` in a fresh process turns into the same model
        (writing a temporary artifact under ``scratch`` if needed), or None."""
        ...

    def reopen_options(self) -> dict[str, Any]:
        """Options for :func:`open_runnable` that make the reopened model run as this one."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runnable: ...

    def __exit__(self, *exc: object) -> None: ...


class RunnableBase:
    """Shared behaviour: context manager, unbatched ``logits_batch``, ``logits_shared`` on
    top of ``logits_batch``."""

    backend = "base"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def reopen_options(self) -> dict[str, Any]:
        return {}

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def logits_batch(self, seqs: Sequence[Sequence[int]],
                     last: Sequence[int] | None = None) -> list[torch.Tensor]:
        out = [self.logits(s) for s in seqs]
        return out if last is None else [o[len(o) - k:] for o, k in zip(out, last, strict=True)]

    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        flat = [[*prefix, *b] for prefix, branches in trees for b in branches]
        rows = iter(self.logits_batch(flat, last=[n for wanted in last for n in wanted]))
        return [[next(rows) for _ in branches] for _, branches in trees]

    def _check_length(self, n: int) -> None:
        limit = getattr(self, "max_context", None)
        if limit is not None and n > limit:
            raise EvaluationError(f"{n} tokens do not fit the model's context of {limit}; "
                                  "use a shorter window or prompt")


def engine_of(runnable: Runnable) -> Engine:
    """The engine that generates with ``runnable``'s loaded weights: the Runnable itself for
    the torch and llama.cpp backends (their Runnables extend their engines).

    Raises:
        EvaluationError: a Runnable that only scores (it cannot generate or be timed).
    """
    from ..engine.base import Engine

    if isinstance(runnable, Engine):
        return runnable
    raise EvaluationError(f"{getattr(runnable, 'name', runnable)} ({runnable.backend}) has no "
                          "engine: it scores but cannot generate or be timed")


# --- opening --------------------------------------------------------------------------------

Opener = Callable[..., Runnable]
_BACKENDS: dict[str, tuple[Callable[[Any], bool], str]] = {}


def register_backend(name: str, accepts: Callable[[Any], bool], opener: str) -> None:
    """Register a backend: ``accepts(source)`` says whether it opens ``source`` by default
    (asked in registration order, the torch fallback last); ``opener`` is
    ``"module:function"``, imported only when used."""
    _BACKENDS[name] = (accepts, opener)


def _is_gguf_file(source: Any) -> bool:
    return (isinstance(source, str | os.PathLike) and str(source).lower().endswith(".gguf")
            and Path(source).is_file())


def _is_peer_artifact(source: Any) -> bool:
    """A folder written by a peer tool's adapter (:mod:`edgequant.backends.peers`)."""
    return isinstance(source, str | os.PathLike) and \
        (Path(source) / "edgequant-peer.json").is_file()


register_backend("llama.cpp", _is_gguf_file, "edgequant.backends.llamacpp:open_gguf")
register_backend("peer", _is_peer_artifact, "edgequant.backends.peers:open_peer")
register_backend("torch", lambda s: True, "edgequant.backends.torch_native:open_torch")
_FALLBACK = "torch"


def backend_names() -> list[str]:
    return list(_BACKENDS)


def open_runnable(source: Any, backend: str | None = None, **options: Any) -> Runnable:
    """Make a :class:`Runnable` of ``source``.

    Args:
        source: a ``Runnable`` (returned as is), an ``edgequant.Model``, a ``.gguf`` file
            (llama.cpp by default), or anything ``eq.load`` takes: a zoo name, an HF folder,
            a native artifact folder, a hub id (torch).
        backend: force a backend (``"torch"`` runs a ``.gguf`` dequantized in transformers).
        options: backend options, e.g. ``threads``, ``device`` (torch), ``n_ctx`` (llama.cpp).

    Example:
        >>> with eq.open("smollm2-135m") as r:
        ...     r.logits(r.tokenize("Hello"))
        ...     r.generate("Hello", max_tokens=8).text   # the torch/llama.cpp ones are engines
    """
    if isinstance(source, Runnable):
        return source
    if backend is None:  # the torch fallback accepts anything: ask it last
        order = [n for n in _BACKENDS if n != _FALLBACK] + [_FALLBACK]
        backend = next(n for n in order if _BACKENDS[n][0](source))
    if backend not in _BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; known: {', '.join(_BACKENDS)}")
    module_name, func = _BACKENDS[backend][1].split(":")
    opener: Opener = getattr(importlib.import_module(module_name), func)
    return opener(source, **options)
