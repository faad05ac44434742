"""Small builders shared by tests: an in-memory tokenizer and HF folders of tiny models."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer with ``vocab_size`` entries (ids 0..3 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def save_hf_folder(module: nn.Module, path: Path) -> Path:
    """Write ``module`` and a tiny tokenizer as an HF checkpoint folder."""
    module.save_pretrained(path)
    tiny_tokenizer(module.config.vocab_size).save_pretrained(path)
    return path
