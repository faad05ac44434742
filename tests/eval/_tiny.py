"""Tiny in-memory models with a byte-level tokenizer (any text tokenizes; no files, no hub)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgequant.backends.base import RunnableBase
from edgequant.models.model import Model

SPECIALS = ("<s>", "</s>", "<pad>")
VOCAB = 256 + len(SPECIALS)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def byte_tokenizer(add_bos: bool = False, chat: bool = False):
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, then specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = {b: c for b, c in enumerate(_bytes_to_unicode())}
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 256)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def tiny_module(seed: int = 0, vocab: int = VOCAB, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=vocab,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(seed)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so metrics move
        module.lm_head.weight.mul_(20)
    return module


def tiny_model(seed: int = 0, add_bos: bool = False, chat: bool = False) -> Model:
    return Model(tiny_module(seed), byte_tokenizer(add_bos, chat),
                 {"name": f"tiny-{seed}", "path": None, "sha256": None, "kind": "memory"})


class TableRunnable(RunnableBase):
    """A fake Runnable whose logits at each position are a fixed function of the token there:
    ``table[token]`` (``table``: ``(V, V)``). Tokens are the text's bytes."""

    backend = "fake"
    name = "table"
    eos_id = None
    add_bos = False
    max_context = 10_000
    threads = 1

    def __init__(self, table: torch.Tensor, bos_id: int = 0) -> None:
        self.table = table.float()
        self.vocab_size = table.shape[0]
        self.bos_id = bos_id
        self.calls = 0

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        self.calls += 1
        return self.table[torch.tensor(list(token_ids), dtype=torch.long)]

    def tokenizer_fingerprint(self) -> str:
        return "bytes"

    def identity(self) -> dict:
        return {"name": "table", "weights_sha256": None}

    def size_info(self) -> dict:
        return {}

    def reopen_spec(self, scratch) -> None:
        return None
