"""A transformers tokenizer as the ``tokenizer.ggml.*`` keys llama.cpp reads.

Everything comes from the in-memory tokenizer (its ``tokenizers`` JSON, added tokens and special
ids), so a native artifact or a GGUF-loaded model converts as well as an HF folder does. The
rules follow llama.cpp's ``convert_hf_to_gguf.py`` (as vendored by llama-cpp-python 0.3.36):

============== ========================================================================
tokenizer      written as
============== ========================================================================
byte-level BPE ``tokenizer.ggml.model = "gpt2"``; tokens as in the vocabulary (ids missing
(GPT-2 style)  from it become ``[PAD<i>]``, UNUSED); added tokens are CONTROL when special
               or when they look special (``<|...|>``), else USER_DEFINED; ``merges``;
               ``pre`` identified by hashing the token ids of llama.cpp's check text
               (``get_vocab_base_pre``): SmolLM2 is ``smollm``, Qwen2 ``qwen2``, Llama 3
               ``llama-bpe``
SentencePiece  ``tokenizer.ggml.model = "llama"``, ``pre = "default"``; pieces keep ``▁``;
(BPE with      ``scores`` (Unigram: its own; BPE: minus the rank of the merge that makes the
``▁``, or      piece, so llama.cpp's highest-score-first merging picks HF's lowest-rank
Unigram)       merge); token types NORMAL / UNKNOWN / CONTROL / USER_DEFINED / BYTE
               (``<0x0A>``)
============== ========================================================================

Special ids (bos/eos/unk/pad) come from the tokenizer, then from the model config. Whether
BOS/EOS are added is read off what the tokenizer actually does to a short text.

Example:
    >>> kv = tokenizer_kv(model.tokenizer, vocab_size=model.module.config.vocab_size)
    >>> kv.model, kv.pre, len(kv.tokens)
    ('gpt2', 'smollm', 49152)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

import gguf
from gguf import GGUFValueType, Keys

from ..errors import GGUFError

__all__ = ["KNOWN_PRE", "TokenizerKV", "bpe_pre", "tokenizer_kv"]

TT = gguf.TokenType

# llama.cpp's get_vocab_base_pre: hash of the token ids of this text -> pre-tokenizer name.
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501

#: The hashes of the tokenizers of the families we convert (a subset of llama.cpp's table;
#: pass ``pre=`` to ``tokenizer_kv`` for another tokenizer).
KNOWN_PRE: dict[str, str] = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerKV:
    """The tokenizer keys of a GGUF file, ready to write.

    Attributes:
        model: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece).
        pre: the pre-tokenizer name (``smollm``, ``qwen2``, ``default``, …).
        tokens: one string per id, ``vocab_size`` of them.
        token_types: ``gguf.TokenType`` values, one per token.
        scores: SentencePiece scores (None for ``gpt2``).
        merges: BPE merges as ``"a b"`` strings (None for ``llama``).
        special_ids: ``bos``/``eos``/``unk``/``pad`` -> token id (those the tokenizer has).
        add_bos / add_eos: whether the tokenizer adds them to a plain text.
        add_space_prefix: SentencePiece's leading ``▁`` (None: not written).
        chat_template: the Jinja chat template, if any.
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def items(self) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
        """``(key, value, type, array item type)`` for every key, in llama.cpp's order."""
        arr, s = GGUFValueType.ARRAY, GGUFValueType.STRING
        out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
        if self.add_space_prefix is not None:
            out.append((Keys.Tokenizer.ADD_PREFIX, self.add_space_prefix, GGUFValueType.BOOL,
                        None))
        out += [(Keys.Tokenizer.MODEL, self.model, s, None),
                (Keys.Tokenizer.PRE, self.pre, s, None),
                (Keys.Tokenizer.LIST, self.tokens, arr, s)]
        if self.scores is not None:
            out.append((Keys.Tokenizer.SCORES, self.scores, arr, GGUFValueType.FLOAT32))
        out.append((Keys.Tokenizer.TOKEN_TYPE, self.token_types, arr, GGUFValueType.INT32))
        if self.merges:
            out.append((Keys.Tokenizer.MERGES, self.merges, arr, s))
        keys = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID,
                "unk": Keys.Tokenizer.UNK_ID, "pad": Keys.Tokenizer.PAD_ID}
        for kind, key in keys.items():
            if kind in self.special_ids:
                out.append((key, self.special_ids[kind], GGUFValueType.UINT32, None))
        out += [(Keys.Tokenizer.ADD_BOS, self.add_bos, GGUFValueType.BOOL, None),
                (Keys.Tokenizer.ADD_EOS, self.add_eos, GGUFValueType.BOOL, None)]
        if self.chat_template:
            out.append((Keys.Tokenizer.CHAT_TEMPLATE, self.chat_template, s, None))
        return out


def tokenizer_kv(tokenizer: Any, vocab_size: int, config: Any = None,
                 pre: str | None = None) -> TokenizerKV:
    """Describe ``tokenizer`` as GGUF tokenizer keys.

    Args:
        tokenizer: a fast transformers tokenizer (``tokenizer.backend_tokenizer``).
        vocab_size: rows of the embedding; the token list is padded to it.
        config: the model config, for special ids the tokenizer lacks.
        pre: force the ``tokenizer.ggml.pre`` name of a byte-level BPE tokenizer whose hash
            is not in :data:`KNOWN_PRE`.

    Raises:
        GGUFError: not a fast tokenizer, a tokenizer model llama.cpp cannot run
            (WordLevel, WordPiece), ids beyond ``vocab_size``, or an unknown BPE
            pre-tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                        "GGUF export needs one (load the model with its tokenizer.json)")
    spec = json.loads(backend.to_str())
    kind = spec.get("model", {}).get("type")
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(vocab.values())}, beyond the "
                        f"model's vocabulary of {vocab_size}")
    if kind == "BPE" and _is_byte_level(spec):
        kv = _gpt2_vocab(tokenizer, spec, vocab, vocab_size, pre)
    elif kind in ("BPE", "Unigram"):
        kv = _spm_vocab(tokenizer, spec, vocab, vocab_size)
    else:
        raise GGUFError(f"tokenizer model {kind!r} has no llama.cpp equivalent; GGUF export "
                        "supports byte-level BPE (GPT-2 style) and SentencePiece tokenizers")
    kv.special_ids = _special_ids(tokenizer, config, vocab_size)
    kv.add_bos, kv.add_eos = _adds_specials(tokenizer, kv.special_ids)
    template = getattr(tokenizer, "chat_template", None)
    kv.chat_template = template if isinstance(template, str) and template else None
    return kv


def bpe_pre(tokenizer: Any) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, or None if unknown."""
    ids = tokenizer.encode(_CHKTXT)
    return KNOWN_PRE.get(sha256(str(ids).encode()).hexdigest())


# --- byte-level BPE -----------------------------------------------------------------------


def _is_byte_level(spec: dict[str, Any]) -> bool:
    return '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))


def _gpt2_vocab(tokenizer: Any, spec: dict[str, Any], vocab: dict[str, int], vocab_size: int,
                pre: str | None) -> TokenizerKV:
    """``get_vocab_base`` + ``_set_vocab_gpt2`` of convert_hf_to_gguf.py."""
    name = pre or bpe_pre(tokenizer)
    if name is None:
        digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
        raise GGUFError(f"unknown BPE pre-tokenizer (llama.cpp hash {digest}); pass "
                        "pre='<name>' naming llama.cpp's pre-tokenizer for this tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(TT.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256))
                                                     for p in m)
              for m in spec["model"].get("merges", [])]
    prefix = getattr(tokenizer, "add_prefix_space", None)
    return TokenizerKV("gpt2", name, tokens, [int(t) for t in types], merges=merges,
                       add_space_prefix=prefix if isinstance(prefix, bool) else None)


def _looks_special(token: str) -> bool:
    """``does_token_look_special`` of convert_hf_to_gguf.py."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# --- SentencePiece ------------------------------------------------------------------------


def _spm_vocab(tokenizer: Any, spec: dict[str, Any], vocab: dict[str, int],
               vocab_size: int) -> TokenizerKV:
    model = spec["model"]
    if model["type"] == "Unigram":
        scores = [float(s) for _, s in model["vocab"]]
    else:
        scores = _bpe_scores(vocab, model.get("merges", []))
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    reverse = {i: t for t, i in vocab.items()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TT.UNUSED)] * vocab_size
    out_scores = [-10000.0] * vocab_size
    for i, piece in reverse.items():
        tokens[i] = piece
        out_scores[i] = scores[i] if i < len(scores) else -1000.0
        if _BYTE_TOKEN.fullmatch(piece):  # llama.cpp's byte fallback needs the BYTE type
            types[i], out_scores[i] = int(TT.BYTE), 0.0
        elif i in added:
            out_scores[i] = -1000.0
            special_like = added[i].special or _looks_special(piece) or i in special
            types[i] = int(TT.CONTROL if special_like else TT.USER_DEFINED)
            if not special_like:
                tokens[i] = piece.replace("\u2581", " ")
        elif i == unk:
            types[i] = int(TT.UNKNOWN)
        elif i in special:
            types[i] = int(TT.CONTROL)
        else:
            types[i] = int(TT.NORMAL)
    return TokenizerKV("llama", "default", tokens, types, scores=out_scores,
                       add_space_prefix=_adds_space_prefix(spec))


def _bpe_scores(vocab: dict[str, int], merges: list[Any]) -> list[float]:
    """Minus the rank of the merge that makes each piece; pieces no merge makes get the
    lowest score (llama.cpp merges the highest-scoring adjacent pair first)."""
    n = max(vocab.values(), default=-1) + 1
    scores = [-float(len(merges) + 1)] * n
    for rank, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(left + right)
        if i is not None and scores[i] == -float(len(merges) + 1):
            scores[i] = -float(rank)
    for piece, i in vocab.items():  # single symbols are never the result of a merge
        if len(piece) == 1 or _BYTE_TOKEN.fullmatch(piece):
            scores[i] = 0.0
    return scores


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    meta = re.search(r'"prepend_scheme": "(\w+)"', text)
    return bool(meta and meta.group(1) in ("always", "first"))


# --- special tokens -----------------------------------------------------------------------


def _special_ids(tokenizer: Any, config: Any, vocab_size: int) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is None and config is not None:
            tid = getattr(config, f"{kind}_token_id", None)
            if isinstance(tid, list | tuple):
                tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            out[kind] = tid
    return out


def _adds_specials(tokenizer: Any, ids: dict[str, int]) -> tuple[bool, bool]:
    """What the tokenizer adds around a plain text: (BOS first, EOS last)."""
    text = "Hello world"
    plain = list(tokenizer.encode(text, add_special_tokens=False))
    full = list(tokenizer.encode(text, add_special_tokens=True))
    if len(full) <= len(plain):
        return False, False
    bos = "bos" in ids and full[0] == ids["bos"] and (not plain or plain[0] != ids["bos"])
    eos = "eos" in ids and full[-1] == ids["eos"] and (not plain or plain[-1] != ids["eos"])
    return bos, eos
