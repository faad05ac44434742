"""The llama.cpp backend: a ``.gguf`` file run by llama-cpp-python, as a Runnable.

The Runnable is a :class:`~edgequant.engine.llamacpp_engine.LlamaCppEngine` — one llama.cpp
context whose sequences are the engine's states — with evaluation's scoring added:
``logits`` evaluates a sequence on a fresh state asking a logits row for every position, and
``logits_shared`` evaluates each prefix once and every branch after it, rewinding the state
to the prefix's end in between (:meth:`~edgequant.engine.Engine.rewind`, the same machinery a
server uses to reuse a cached prefix). Generation, prefill and decode timings go through the
same engine, which asks llama.cpp for the last position's logits only, as it runs when it
generates. Nothing here imports torch until ``logits`` returns, so a measuring subprocess for
a GGUF file holds llama.cpp's memory, not torch's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.llamacpp_engine import LlamaCppEngine, extra_bufts_supported
from ..errors import ModelLoadError
from .base import RunnableBase

if TYPE_CHECKING:
    import torch

__all__ = ["LlamaCppRunnable", "extra_bufts_supported", "open_gguf"]


class LlamaCppRunnable(LlamaCppEngine, RunnableBase):
    """A GGUF file behind the Runnable interface, and its engine.

    Args: those of :class:`~edgequant.engine.llamacpp_engine.LlamaCppEngine` (``path``,
    ``threads``, ``n_ctx``, ``n_batch``, ``parallel``, ``extra_bufts``).
    """

    backend = "llama.cpp"
    _sha256: str | None = None

    def tokenizer_fingerprint(self) -> str:
        from ..data.tokens import fingerprint

        return fingerprint(self.tokenize, self.bos_id)

    # --- compute --------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        import torch

        self._check_length(len(token_ids))
        if not token_ids:
            return torch.zeros((0, self.vocab_size))
        with self.new_state(len(token_ids)) as state:
            return torch.from_numpy(self.forward(state, token_ids, len(token_ids)))

    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        """Each prefix evaluated once on one state; every branch is evaluated after it, the
        state rewound to the prefix's end in between (llama.cpp drops the branch's cells)."""
        import torch

        out: list[list[torch.Tensor]] = []
        for (prefix, branches), keep in zip(trees, last, strict=True):
            p = len(prefix)
            need = p + max((len(b) for b in branches), default=0)
            self._check_length(need)
            # rows of the prefix itself that some branch wants (a short or empty branch)
            reach = min(p, max((k - len(b) for b, k in zip(branches, keep, strict=True)),
                               default=0))
            rows: list[torch.Tensor] = []
            with self.new_state(max(need, 1)) as state:
                pre = self.forward(state, prefix, max(reach, 0)) if p else self._none()
                for b, k in zip(branches, keep, strict=True):
                    self.rewind(state, p)
                    new = self.forward(state, b, min(k, len(b))) if b else self._none()
                    back = k - len(new)
                    if back > 0:
                        new = np.concatenate([pre[len(pre) - back:], new])
                    rows.append(torch.from_numpy(new))
            out.append(rows)
        return out

    def _none(self) -> np.ndarray:
        return np.zeros((0, self.vocab_size), dtype=np.float32)

    # --- identity -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        if self._sha256 is None:
            from ..io_utils import sha256_file

            self._sha256 = sha256_file(self.path)
        return {"name": self.path.name, "path": str(self.path.resolve()), "sha256": self._sha256,
                "kind": "gguf", "file_type": self.metadata.get("general.file_type"),
                "llama_extra_bufts": self.extra_bufts,
                "weights_sha256": self._sha256}

    def size_info(self) -> dict[str, Any]:
        from ..eval.size import gguf_size_info

        return gguf_size_info(self.path)

    def reopen_spec(self, scratch: Path) -> str | None:
        return str(self.path.resolve())

    def reopen_options(self) -> dict[str, Any]:
        return {"extra_bufts": self.extra_bufts, "threads": self.threads}


def open_gguf(source: Any, threads: int | None = None, **options: Any) -> LlamaCppRunnable:
    """Open a ``.gguf`` file with llama.cpp."""
    if not (isinstance(source, str | os.PathLike) and Path(source).is_file()):
        raise ModelLoadError(f"the llama.cpp backend runs .gguf files; {source!r} is not one")
    return LlamaCppRunnable(source, threads=threads, **options)
