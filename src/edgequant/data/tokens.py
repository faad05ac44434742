"""Token streams: a corpus tokenized once per tokenizer, cached on disk, and sampled.

A stream is the concatenation of each document's tokens, documents separated by ``"\\n\\n"``
(each document but the last is tokenized as ``doc + "\\n\\n"``), with no special tokens. It is
cached under ``<cache>/tokens/`` keyed by the corpus identity and the tokenizer's
*fingerprint*, so every model that tokenizes the same way — a torch model and the GGUF it came
from, run by llama.cpp — is scored on exactly the same token ids.

A fingerprint is the sha256 of how a tokenizer encodes a fixed set of probe strings, plus its
BOS id: equal fingerprints mean "same tokens for the same text" for all practical purposes,
and KL divergence between models whose fingerprints differ is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..cache import cache_root
from ..errors import DataError
from ..io_utils import atomic_file
from .corpora import load_corpus

FINGERPRINT_VERSION = 1
_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces\tand\ttabs\n\nand blank lines\n",
    "naïve café — Zürich, 東京, Ωμέγα, emoji 🚀",
    "def f(x):\n    return x ** 2 + 3.14159  # comment",
    "1234567890 12,345.67 2026-11-28 #42 @user http://example.com/a?b=c",
    "It's THE end. isn't it?! (yes) [no] {maybe}",
)


@runtime_checkable
class TextTokenizer(Protocol):
    """What data needs of a tokenizer: plain-text encoding and an identity."""

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...

    def tokenizer_fingerprint(self) -> str: ...


def fingerprint(encode: Callable[[str], list[int]], bos_id: int | None) -> str:
    """sha256 identifying a tokenizer by its encodings of fixed probe strings and its BOS."""
    payload = {"v": FINGERPRINT_VERSION, "bos": bos_id,
               "probes": [list(map(int, encode(p))) for p in _PROBES]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class HFTextTokenizer:
    """A transformers tokenizer seen as a :class:`TextTokenizer`.

    ``tokenize`` adds no special tokens and, unless ``special``, reads special-token strings
    (``<|im_start|>``) as plain text, as llama.cpp's ``tokenize(special=False)`` does.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.bos_id: int | None = bos if bos is not None else tokenizer.eos_token_id
        self._fp: str | None = None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False,
                                          split_special_tokens=not special))

    def tokenizer_fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.tokenize, self.bos_id)
        return self._fp


def as_text_tokenizer(tokenizer: Any) -> TextTokenizer:
    """A Runnable or a TextTokenizer as is; a transformers tokenizer wrapped."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "bos_token_id"):
        return HFTextTokenizer(tokenizer)
    raise DataError(f"{type(tokenizer).__name__} is not a tokenizer (needs tokenize() and "
                    "tokenizer_fingerprint(), or a transformers tokenizer)")


def corpus_tokens(name: str, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """The corpus ``name`` as one token stream (int64, 1-D), cached per tokenizer.

    Args:
        name: a built-in corpus (``wiki``, ``lambada``, ``shakespeare``) or a text file path.
        tokenizer: a Runnable, a :class:`TextTokenizer` or a transformers tokenizer.
        max_tokens: keep only the first ``max_tokens`` tokens.

    Raises:
        DataError: unknown corpus, unreadable file, or a corpus that tokenizes to nothing.
    """
    tok = as_text_tokenizer(tokenizer)
    corpus = load_corpus(name)
    fp = tok.tokenizer_fingerprint()
    key = hashlib.sha256(corpus.key.encode()).hexdigest()[:16]
    path = cache_root() / "tokens" / f"{key}-{fp[:16]}.npy"
    ids = _load(path)
    if ids is None:
        docs = corpus.documents
        parts = [tok.tokenize(d + "\n\n" if i < len(docs) - 1 else d) for i, d in enumerate(docs)]
        ids = np.fromiter((t for p in parts for t in p), dtype=np.int32)
        if ids.size == 0:
            raise DataError(f"corpus {corpus.name!r} has no tokens")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids, allow_pickle=False)
    out = torch.from_numpy(ids.astype(np.int64))
    return out[:max_tokens] if max_tokens is not None else out


def sample_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` consecutive tokens at seeded random offsets: ``(n, seq_len)``.

    The same ``(tokens, n, seq_len, seed)`` always gives the same windows.

    Raises:
        DataError: the stream is shorter than one window, or ``n``/``seq_len`` < 1.
    """
    if n < 1 or seq_len < 1:
        raise DataError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if tokens.numel() < seq_len:
        raise DataError(f"the token stream has {tokens.numel()} tokens, fewer than one window "
                        f"of {seq_len}; use a longer corpus or a shorter seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def _load(path: Any) -> np.ndarray | None:
    try:
        with open(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 1 and arr.dtype == np.int32 else None
