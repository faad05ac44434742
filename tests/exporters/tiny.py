"""Tiny models with real tokenizers for the GGUF tests: built in memory, seconds at most.

Widths are multiples of 256 so that every K-quant applies (no fallback), yet a model has
about a million parameters. Norm weights and biases are randomised: with HF's initial values
(ones, zeros) a wrong offset or a dropped bias would go unnoticed.
"""

from __future__ import annotations

import torch

from edgequant.models.model import Model

TEXT = [
    "the quick brown fox jumps over the lazy dog and then the dog sleeps in the warm sun",
    "a small model of language reads the text and predicts the next word of the text",
    "quantization stores every weight in fewer bits, and the model becomes small enough",
    "llama reads the file, allocates the tensors and runs the graph on the processor",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style; llama.cpp pre-tokenizer ``gpt-2``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 10, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|im_end|>")
    out.chat_template = CHAT_TEMPLATE
    return out


def spm_tokenizer():
    """A SentencePiece-style BPE tokenizer (``▁`` for spaces, byte fallback, adds ``<bos>``),
    like Gemma's."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = sorted(set("".join(TEXT).replace(" ", "\u2581")) | {"\u2581"})
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
        initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(TEXT * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if "gemma" in type(module).__name__
                                                     .lower() else 1.0))
            elif name.endswith("bias"):
                p.normal_(0, 0.3)


def tiny(arch: str, hidden: int = 256, n_layer: int = 2, tied: bool | None = None) -> Model:
    """A tiny ``llama`` | ``qwen2`` | ``gemma3`` Model with a matching tokenizer."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = spm_tokenizer() if arch == "gemma3" else bpe_tokenizer()
    common = dict(hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=len(tok),
                  max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=bool(tied), rope_theta=10000.0)
        module = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=bool(tied))
        module = Qwen2ForCausalLM(config)
    elif arch == "gemma3":
        head_dim = hidden // 4
        config = Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                  sliding_window=16, tie_word_embeddings=tied is not False,
                                  layer_types=["sliding_attention", "full_attention"][:n_layer]
                                  + ["sliding_attention"] * max(0, n_layer - 2))
        module = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    _randomise(module)
    return Model(module.eval(), tok, {"name": f"tiny-{arch}", "kind": "memory"})


def text_ids(model: Model, n: int = 40) -> list[int]:
    """``n`` token ids of plain text, BOS first (longer than gemma's window of 16)."""
    body = model.tokenizer.encode(" ".join(TEXT), add_special_tokens=False)
    bos = model.tokenizer.bos_token_id
    return [bos, *body][:n]
