"""The torch backend: a :class:`~edgequant.models.model.Model` as a Runnable.

Runs anything ``eq.load`` returns — an original model (zoo name, HF folder, hub id, a GGUF
dequantized by transformers) or a native artifact with ``QuantLinear`` layers — through
its transformers module. The Runnable is a :class:`~edgequant.engine.torch_engine.TorchEngine`
(generation on explicit per-state KV caches) with evaluation's scoring added.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ..compute import dtype_name, resolve_compute_dtype
from ..engine.torch_engine import TorchEngine
from ..errors import ModelLoadError
from ..models.model import Model
from .base import RunnableBase


class TorchRunnable(TorchEngine, RunnableBase):
    """A ``Model`` behind the Runnable interface, and its engine.

    Args:
        model: the model; it is used where it is (a given model is never moved).
        reopen: a source that loads the same weights in a fresh process (set when the
            model was opened from one); otherwise :meth:`reopen_spec` writes them out.
        batch_tokens: most tokens (rows × longest) one ``logits_batch`` forward holds.
    """

    backend = "torch"

    def __init__(self, model: Model, reopen: str | None = None, batch_tokens: int = 4096) -> None:
        TorchEngine.__init__(self, model.module, model.tokenizer, model.name)
        self.model = model
        self._reopen = reopen
        self._batch_tokens = batch_tokens

    @property
    def runtime(self) -> dict[str, Any]:
        """How it computes (recorded with speed results): dtype, device, the kernels its
        quantized layers run on (layers per kernel) and why any fell back (layers per
        reason; see :func:`edgequant.kernels.use_kernels`)."""
        from ..kernels import kernel_plan

        return {"dtype": dtype_name(self.dtype), "device": self.device.type,
                **kernel_plan(self.module).summary()}

    # --- tokens ---------------------------------------------------------------------------

    def tokenizer_fingerprint(self) -> str:
        return self._tok.tokenizer_fingerprint()

    # --- compute --------------------------------------------------------------------------

    def weights_cached(self) -> AbstractContextManager[None]:
        """Quantized layers keep their dequantized weights while inside (accuracy metrics;
        see :func:`~edgequant.nn.quant_linear.dequantized_weights_cached`)."""
        from ..nn.quant_linear import dequantized_weights_cached

        return dequantized_weights_cached(self.module)

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        self._check_length(len(token_ids))
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        return self.module(input_ids=ids, use_cache=False).logits[0].float().cpu()

    @torch.inference_mode()
    def logits_batch(self, seqs: Sequence[Sequence[int]],
                     last: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Right-padded batches. A causal model's position ``t`` sees only positions ≤ t, so
        the pad positions after a shorter sequence never influence its rows, and only its
        own ``len(seq)`` rows are returned: padding never counts. With ``last``, the LM head
        runs only on the batch's last ``K`` positions that cover every row's wanted ones
        (``logits_to_keep``), sparing most of its (T × vocab) work and memory."""
        out: list[torch.Tensor] = []
        want = [len(s) for s in seqs] if last is None else list(last)
        start = 0
        for group in _groups(seqs, self._batch_tokens):
            keep = want[start:start + len(group)]
            start += len(group)
            longest = max(len(s) for s in group)
            self._check_length(longest)
            batch = torch.zeros((len(group), longest), dtype=torch.long)
            for i, s in enumerate(group):
                batch[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            k = max(1, max(longest - len(s) + n for s, n in zip(group, keep, strict=True)))
            logits = self.module(input_ids=batch.to(self.device), use_cache=False,
                                 logits_to_keep=k).logits
            for i, (s, n) in enumerate(zip(group, keep, strict=True)):
                end = len(s) - (longest - k)      # row i's length, in the kept positions
                out.append(logits[i, end - n:end].float().cpu())
        return out

    @torch.inference_mode()
    def logits_shared(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        """Each prefix computed once: a tree ``prefix + branch₀ + branch₁ + …`` is one row
        whose attention mask lets a branch token see the prefix and its own branch only,
        with position ids that restart each branch where the prefix ends — the same
        attention, positions and so logits (to float rounding) as ``prefix + branchⱼ`` on its
        own. Choices of a multiple-choice item share their context, so this cuts task
        scoring's work by about the number of choices. A sliding-window model whose
        sequences reach its window takes the plain path (the tree mask has no window)."""
        longest = max((len(p) + len(b) for p, bs in trees for b in bs), default=0)
        window = getattr(self.module.config.get_text_config(), "sliding_window", None)
        if window is not None and longest >= window:
            return super().logits_shared(trees, last)
        self._check_length(longest)
        rows = [[*p, *(t for b in bs for t in b)] for p, bs in trees]
        out: list[list[torch.Tensor]] = [[] for _ in trees]
        order = sorted(range(len(trees)), key=lambda i: -len(rows[i]))
        start = 0
        for group in _groups([rows[i] for i in order], self._batch_tokens):
            idx = order[start:start + len(group)]
            start += len(group)
            self._tree_forward([trees[i] for i in idx], [last[i] for i in idx],
                               [out[i] for i in idx])
        return out

    def _tree_forward(self, trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      last: Sequence[Sequence[int]], into: list[list[torch.Tensor]]) -> None:
        """One forward over a batch of tree rows (right-padded); appends each branch's
        wanted logits to ``into[i]``."""
        width = max(len(p) + sum(len(b) for b in bs) for p, bs in trees)
        n = len(trees)
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        seg = torch.full((n, width), -2, dtype=torch.long)   # -1 prefix, j branch j, -2 pad
        wanted: list[list[list[int]]] = []
        for r, ((prefix, branches), keep) in enumerate(zip(trees, last, strict=True)):
            p = len(prefix)
            toks, ps, sg = list(prefix), list(range(p)), [-1] * p
            per_branch = []
            for j, (b, k) in enumerate(zip(branches, keep, strict=True)):
                offset = len(toks)
                toks += b
                ps += range(p, p + len(b))
                sg += [j] * len(b)
                end = p + len(b)   # positions end - k … end - 1 of prefix + b
                per_branch.append([t if t < p else offset + t - p for t in range(end - k, end)])
            ids[r, :len(toks)] = torch.tensor(toks)
            pos[r, :len(ps)] = torch.tensor(ps)
            seg[r, :len(sg)] = torch.tensor(sg)
            wanted.append(per_branch)
        see = (pos[:, None, :] <= pos[:, :, None]) & \
            ((seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None]))
        dtype = self.dtype
        mask = torch.zeros(see.shape, dtype=dtype).masked_fill_(~see, torch.finfo(dtype).min)
        keep_idx = sorted({t for per in wanted for w in per for t in w})
        column = {t: c for c, t in enumerate(keep_idx)}
        logits = self.module(input_ids=ids.to(self.device),
                             attention_mask=mask[:, None].to(self.device),
                             position_ids=pos.to(self.device), use_cache=False,
                             logits_to_keep=torch.tensor(keep_idx, device=self.device)).logits
        for r, per_branch in enumerate(wanted):
            for w in per_branch:
                into[r].append(logits[r, [column[t] for t in w]].float().cpu())

    # --- identity -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        out = dict(self.model.source)
        out["quantized"] = self.model.is_quantized
        if self.model.recipe is not None:
            out["recipe"] = self.model.recipe.to_dict()
        if self._reopen is not None:
            out["opened_from"] = self._reopen
        out["weights_sha256"] = self._weights_sha256()
        return out

    def _weights_sha256(self) -> str | None:
        """sha256 of the weights file this model was opened from; None for a model given
        in memory (it may differ from any file, so nothing is cached under its name)."""
        if self._reopen is None:
            return None
        path = _local_path(self._reopen)
        if path is not None and path.is_dir():
            from ..models.artifact import MANIFEST, WEIGHTS

            if (path / MANIFEST).is_file():
                import json

                files = json.loads((path / MANIFEST).read_text()).get("files", {})
                return files.get(WEIGHTS)  # type: ignore[no-any-return]
        return None if self.model.is_quantized else self.model.source.get("sha256")

    def size_info(self) -> dict[str, Any]:
        from ..eval.size import model_size_info

        return model_size_info(self.model, _local_path(self._reopen))

    def reopen_spec(self, scratch: Path) -> str | None:
        """The source it was opened from; otherwise the weights written under ``scratch``
        (an artifact for a quantized model, an HF folder for an original one), so the fresh
        process runs exactly these weights."""
        if self._reopen is not None:
            return self._reopen
        target = Path(scratch) / "model"
        if self.model.is_quantized:
            self.model.save(target, force=True)
        else:
            self.module.save_pretrained(target)
            self.tokenizer.save_pretrained(target)
        return str(target)

    def reopen_options(self) -> dict[str, Any]:
        return {"threads": self.threads, "device": self.device.type,
                "dtype": dtype_name(self.dtype)}

    def close(self) -> None:
        """Nothing to free: the module belongs to the ``Model``, caches to their states."""


def _groups(seqs: Sequence[Sequence[int]], budget: int) -> list[list[Sequence[int]]]:
    """Consecutive groups whose (rows × longest) stays within ``budget`` tokens."""
    groups: list[list[Sequence[int]]] = []
    cur: list[Sequence[int]] = []
    longest = 0
    for s in seqs:
        new_longest = max(longest, len(s))
        if cur and new_longest * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, new_longest = [], len(s)
        cur.append(s)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


def _local_path(spec: str | None) -> Path | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.exists():
        return p
    from ..models import zoo

    if spec in zoo.ZOO:
        return zoo.pull(spec)
    return None


def open_torch(source: Any, device: str | None = None, threads: int | None = None,
               dtype: str | None = None, kernels: str | None = None,
               **options: Any) -> TorchRunnable:
    """Open ``source`` (a ``Model`` or anything ``eq.load`` takes) as a TorchRunnable.

    A model opened here (not a given ``Model``) goes to CUDA when present, unless
    ``device`` says otherwise. ``threads`` sets torch's intra-op threads for this process
    (``torch.set_num_threads``) — asked for explicitly, never by default. ``dtype``
    (``float32`` by default, ``bfloat16``, or ``auto``: see :mod:`edgequant.compute`) is
    the dtype it computes in. ``kernels`` picks the kernel of every quantized layer
    (:func:`edgequant.kernels.use_kernels`): ``auto`` (the default for a model opened here:
    the best registered kernel for that dtype and device — in bfloat16 on CPU, 4-bit layers
    on torch's fused int4 kernel, which makes the model inference-only), ``reference``
    (dequantize-then-matmul) or a kernel's name. A given ``Model`` keeps its layers'
    kernels unless ``kernels`` is passed. The choice is recorded in :attr:`runtime`.
    """
    from ..kernels import check_policy, use_kernels

    if kernels is not None:
        check_policy(kernels)
    if threads is not None:
        torch.set_num_threads(threads)
    if isinstance(source, Model):
        runnable = TorchRunnable(source, **options)
        if kernels is not None:
            use_kernels(source.module, runnable.dtype, None, kernels)
        return runnable
    from .. import load

    dt = resolve_compute_dtype(dtype or "float32", ModelLoadError, "the torch backend's dtype")
    model = load(source, dt)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev != "cpu":
        model.module.to(dev)  # pragma: no cover - GPU only
    use_kernels(model.module, dt, dev, kernels or "auto")
    spec = str(Path(source).expanduser().resolve()) if isinstance(source, os.PathLike) or (
        isinstance(source, str) and Path(source).expanduser().exists()) else str(source)
    return TorchRunnable(model, reopen=spec, **options)
