"""The Runnable of a peer artifact: the torch backend's own code over the peer's module.

Tokenization, logits, perplexity, KLD and speed go through :class:`TorchRunnable` unchanged;
only what the weights *are* differs: ``identity`` names the tool, method and artifact,
``size_info`` counts the tool's stored tensors, and ``reopen_spec`` is the artifact folder
(the fresh measuring process opens it with the ``peer`` backend, not from the source).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ...models.model import Model
from ..torch_native import TorchRunnable


def weights_digest(record: dict[str, Any]) -> str | None:
    """One sha256 for the artifact's weight files (from the record)."""
    files = record.get("files") or {}
    if not files:
        return None
    if len(files) == 1:
        return str(next(iter(files.values())))
    lines = "".join(f"{k} {v}\n" for k, v in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def peer_identity(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    src = record.get("source", {})
    return {
        "name": f"{src.get('name', 'model')} [{record['method']}]",
        "path": str(path),
        "kind": "peer",
        "quantized": True,
        "peer": record["method"],
        "tool": record["tool"],
        "tool_version": record.get("tool_version"),
        "scheme": record.get("scheme_label"),
        "config": record.get("config"),
        "reload": record.get("reload"),
        "runtime": record.get("runtime"),
        "source": src,
        "calibration": record.get("calibration"),
        "weights_sha256": weights_digest(record),
    }


class PeerTorchRunnable(TorchRunnable):
    """A peer tool's quantized torch module behind the Runnable interface.

    Args:
        model: the module (with the tool's quantized layers) and its tokenizer.
        path: the artifact folder.
        record: its ``edgequant-peer.json``.
        size: computes ``size_info`` (called once, lazily).
    """

    backend = "peer"

    def __init__(self, model: Model, path: Path, record: dict[str, Any],
                 size: Callable[[], dict[str, Any]], **options: Any) -> None:
        super().__init__(model, reopen=str(path), **options)
        self.path = Path(path)
        self.record = record
        self._size_fn = size
        self._size: dict[str, Any] | None = None
        self.name = peer_identity(self.path, record)["name"]

    def identity(self) -> dict[str, Any]:
        return peer_identity(self.path, self.record)

    def size_info(self) -> dict[str, Any]:
        if self._size is None:
            self._size = {**self._size_fn(), "reload": self.record.get("reload"),
                          "runtime": self.record.get("runtime"), "peer": self.record["method"]}
        return dict(self._size)

    def reopen_spec(self, scratch: Path) -> str | None:
        return str(self.path)

    def reopen_options(self) -> dict[str, Any]:
        """Threads only: the tool loads its artifact on its own device and in its own dtype
        (edgequant's ``dtype``/``device`` options are the torch backend's)."""
        return {"threads": self.threads}


class NoGradPeerRunnable(PeerTorchRunnable):
    """The same, computing under ``torch.no_grad`` instead of ``torch.inference_mode`` (for
    tensor subclasses that cannot run on inference tensors, e.g. quanto's packed qint4)."""

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return TorchRunnable.logits.__wrapped__(self, token_ids)  # type: ignore[attr-defined]

    def logits_batch(self, seqs: Sequence[Sequence[int]],
                     last: Sequence[int] | None = None) -> list[torch.Tensor]:
        with torch.no_grad():
            return TorchRunnable.logits_batch.__wrapped__(  # type: ignore[attr-defined]
                self, seqs, last)

    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return TorchRunnable.logits_shared.__wrapped__(  # type: ignore[attr-defined]
                self, trees, last)

    def _compute(self) -> AbstractContextManager[Any]:
        """Generation's forward passes (the engine's) under ``no_grad`` too."""
        return torch.no_grad()


def torch_runnable(path: Path, record: dict[str, Any], module: Any,
                   layers: dict[str, int], data_suffixes: tuple[str, ...],
                   no_grad: bool = False, inline_data_bytes: int = 0,
                   **options: Any) -> PeerTorchRunnable:
    """Wrap a loaded peer module (eval mode) with the artifact's tokenizer.

    Args:
        layers: the module's quantized linear layers -> weight count (out × in).
        data_suffixes: which of a quantized layer's stored tensors hold weight data
            (see :func:`~edgequant.backends.peers._common.stored_size_info`).
        no_grad: compute under ``no_grad`` instead of ``inference_mode``.
        inline_data_bytes: see :func:`~edgequant.backends.peers._common.stored_size_info`.
    """
    from ._common import load_tokenizer, stored_size_info

    if not layers:
        from ...errors import ModelLoadError

        raise ModelLoadError(f"{path}: no quantized layers found after loading; the artifact "
                             "does not hold what its record says")
    ident = peer_identity(path, record)
    model = Model(module.eval(), load_tokenizer(path),
                  {k: ident[k] for k in ("name", "path", "kind")})
    num_params = int(record.get("source", {}).get("num_params") or 0)

    def size() -> dict[str, Any]:
        return stored_size_info(path, layers, data_suffixes, num_params, inline_data_bytes)

    cls = NoGradPeerRunnable if no_grad else PeerTorchRunnable
    return cls(model, path, record, size, **options)


def linear_layers(module: Any, types: tuple[type, ...]) -> dict[str, int]:
    """Names of ``module``'s submodules of ``types`` -> ``in_features * out_features``."""
    out: dict[str, int] = {}
    for n, m in module.named_modules():
        if isinstance(m, types):
            lin: Any = m
            out[n] = int(lin.in_features) * int(lin.out_features)
    return out
