"""Tiny training setups shared by the fine-tuning tests (random streams, tiny Llama)."""

from __future__ import annotations

import torch

from edgequant.finetuning.data import TextWindows


def windows(seq_len: int = 16, batch_size: int = 2, seed: int = 0, n: int = 4000,
            vocab: int = 128) -> TextWindows:
    g = torch.Generator().manual_seed(123)
    period = torch.randint(2, vocab, (7,), generator=g)   # learnable: a repeating pattern
    stream = period.repeat(n // 7 + 1)[:n]
    return TextWindows(stream, seq_len, batch_size, seed, 1, {"kind": "test"})
