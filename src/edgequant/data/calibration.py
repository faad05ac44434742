"""Calibration sets: seeded windows of real text for the methods that need activations.

Windows are drawn from the *second half* of a corpus's token stream, while evaluation reads
from its start, so calibrating and evaluating on the same corpus (the default, ``wiki``, as
llama.cpp's imatrix practice does with wiki train/test) never sees the same text twice.
Each window starts with the tokenizer's BOS token when it has one, as evaluation windows do.

``compute_dtype`` is the precision of the calibration *forward passes* (block outputs, AWQ's
scale search): ``bfloat16`` runs them under autocast — as the reference GPTQ/AWQ code runs
its models in fp16/bf16 on a GPU — while every statistic (Hessians, means, ranges) is
accumulated in float32 and every weight is quantized from its float32 value. ``auto`` (the
default) picks bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16: ~8x the
float32 speed on this project's machine) and float32 elsewhere; the choice is recorded in
the calibration description saved with the artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import compute
from ..errors import DataError
from .tokens import as_text_tokenizer, corpus_tokens, sample_windows

DEFAULT_CORPUS = "wiki"
def resolve_compute_dtype(name: str) -> torch.dtype:
    """The calibration forwards' dtype (see :mod:`edgequant.compute`)."""
    return compute.resolve_compute_dtype(name, DataError, "calibration compute dtype")


@dataclass
class Calibration:
    """Token windows ``(N, T)`` and a description that is saved with the artifact."""

    tokens: torch.Tensor
    description: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.dtype = resolve_compute_dtype(self.compute_dtype)
        self.description = {**self.description, "compute_dtype": compute.dtype_name(self.dtype)}
        if self.tokens.dim() != 2 or self.tokens.numel() == 0:
            raise DataError(f"calibration data must be a non-empty (samples, tokens) tensor, "
                            f"got shape {tuple(self.tokens.shape)}")
        if self.tokens.shape[1] < 2:
            raise DataError("calibration windows need at least 2 tokens each")


@dataclass(frozen=True)
class CalibrationSpec:
    """What to sample; resolved against a model's tokenizer by :meth:`build`."""

    corpus: str = DEFAULT_CORPUS
    n: int = 128
    seq_len: int = 512
    seed: int = 0
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        resolve_compute_dtype(self.compute_dtype)  # a bad name fails here, before any work

    def build(self, tokenizer: Any) -> Calibration:
        if self.n < 1 or self.seq_len < 2:
            raise DataError(f"calibration needs at least 1 sample of 2 tokens, got "
                            f"n={self.n}, seq_len={self.seq_len}")
        stream = corpus_tokens(self.corpus, tokenizer)
        held = stream[stream.numel() // 2:]
        bos = getattr(as_text_tokenizer(tokenizer), "bos_id", None)
        body = self.seq_len - (1 if bos is not None else 0)
        if held.numel() < body:
            raise DataError(f"corpus {self.corpus!r} is too short for calibration: its second "
                            f"half has {held.numel()} tokens, fewer than one window of "
                            f"{self.seq_len}; use a longer corpus or --calib-len")
        windows = sample_windows(held, self.n, body, seed=self.seed)
        if bos is not None:
            windows = torch.cat([torch.full((self.n, 1), bos, dtype=windows.dtype), windows], 1)
        return Calibration(windows, {**asdict(self), "tokens": int(windows.numel()),
                                     "source": "second half of the token stream"},
                           self.compute_dtype)


def calibration(corpus: str = DEFAULT_CORPUS, n: int = 128, seq_len: int = 512,
                seed: int = 0, compute_dtype: str = "auto") -> CalibrationSpec:
    """A calibration set description, e.g. ``eq.data.calibration("wiki", n=128, seq_len=512)``."""
    return CalibrationSpec(str(corpus), n, seq_len, seed, compute_dtype)


def resolve(calib: Any, tokenizer: Any = None, default: CalibrationSpec | None = None
            ) -> Calibration:
    """The one coercion of calibration input, for every consumer (quantization, importance
    matrices, peers): a ``Calibration`` as is, a ``CalibrationSpec`` or a corpus name
    sampled with ``tokenizer``, ``(N, T)`` token windows, or None for ``default`` (the
    default spec when that is None too).

    Raises:
        DataError: a spec without a tokenizer, or windows of the wrong shape.
    """
    if calib is None:
        calib = default or CalibrationSpec()
    if isinstance(calib, str):
        calib = calibration(calib, n=(default or CalibrationSpec()).n,
                            seq_len=(default or CalibrationSpec()).seq_len)
    if isinstance(calib, CalibrationSpec):
        if tokenizer is None:
            raise DataError("a calibration spec needs the model's tokenizer: pass a Model, or "
                            "token windows")
        return calib.build(tokenizer)
    if isinstance(calib, Calibration):
        return calib
    tokens = torch.as_tensor(calib)
    if tokens.dim() != 2:
        raise DataError(f"calibration tokens must be (windows, tokens), got "
                        f"{tuple(tokens.shape)}")
    return Calibration(tokens.long())
