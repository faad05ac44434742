"""Tiny models saved as HF folders, and a session cache of peer artifacts made from them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ...helpers import save_hf_folder

#: fixed calibration windows for the calibrated peers (ids 4.. are plain words)
CALIB = torch.randint(4, 128, (8, 64), generator=torch.Generator().manual_seed(0))
#: the token ids every logits comparison uses (BOS first)
IDS = [1] + torch.randint(4, 128, (47,), generator=torch.Generator().manual_seed(1)).tolist()


def tiny_peer_module(hidden: int = 256, vocab: int = 128, tie: bool = True):
    """A tiny Llama whose linear widths (256, 512; 128 for k/v) suit every peer's groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def peer_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (tied embeddings, like SmolLM2) with a word-level tokenizer."""
    return save_hf_folder(tiny_peer_module(), tmp_path_factory.mktemp("peer-src") / "tiny")


@pytest.fixture(scope="session")
def made(peer_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Callable[[str], Path]:
    """``made(name)``: that peer's artifact of the tiny model, made once per session."""
    from edgequant.backends import peers

    root = tmp_path_factory.mktemp("peer-artifacts")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            method = peers.get(name)
            calib = CALIB if method.calibrated else None
            cache[name] = method.make(peer_tiny_dir, root / name, calib=calib)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def reference_logits(peer_tiny_dir: Path) -> torch.Tensor:
    from edgequant.backends.base import open_runnable

    with open_runnable(str(peer_tiny_dir), backend="torch") as r:
        return r.logits(IDS)
