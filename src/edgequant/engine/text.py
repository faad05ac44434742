"""Streaming text: token ids to text deltas, and stop strings that never leak.

Two small state machines a generation pushes each new token through, in this order:

- :class:`TextDecoder` turns ids into text one token at a time. A token may end inside a
  multi-byte character (byte-level BPE splits ``é`` or an emoji over several tokens), and a
  SentencePiece tokenizer decodes a token differently at the start of a sequence (it drops
  the ``▁`` space). So each step decodes a short window of recent tokens twice — without and
  with the new ones — and emits the difference, and only once it no longer ends in U+FFFD
  (an unfinished character). The window starts inside the prompt, so the first new token
  keeps its leading space.
- :class:`StopFilter` holds back the longest tail of the text that could still begin a stop
  string, so a stop string — even one split over several tokens — is cut before it is ever
  streamed.

Both are pure Python (no torch, no numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4   # prompt tokens a decoder starts its window with


class TextDecoder:
    """Incremental detokenization (the offsets method of vLLM and transformers' streamer).

    Args:
        detokenize: ids -> text, special tokens rendered.
        context: the prompt's last few tokens (they are never emitted; they make the first
            new token decode as it does mid-sequence).
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str],
                 context: Sequence[int] = ()) -> None:
        self._detok = detokenize
        ids = list(context)[-CONTEXT_TOKENS:]
        if ids and detokenize(ids).endswith(_REPLACEMENT):
            ids = []   # a prompt ending inside a character would shift every offset
        self._ids = ids
        self._prefix = 0            # the window decoded each step starts here
        self._read = len(ids)       # text of ids before this was emitted

    def push(self, token: int) -> str:
        """Add one token; the text it completes ('' while a character is unfinished)."""
        self._ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """What is still held (an unfinished character at the end, as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._detok(self._ids[self._prefix:self._read])
        text = self._detok(self._ids[self._prefix:])
        if len(text) <= len(before) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


class StopFilter:
    """Cuts text before the first stop string and streams only what can no longer be cut.

    Args:
        stops: the stop strings (empty: everything passes at once).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far, cut before the stop string once one appeared."""
        return self._text

    def push(self, delta: str) -> str:
        """Add ``delta``; what may be streamed now."""
        if self.stopped:
            return ""
        self._text += delta
        if not self.stops:
            return self._release(len(self._text))
        # a stop string can only start at or after what was sent: any earlier start was
        # ruled out when that text was released
        hits = [i for i in (self._text.find(s, self._sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self._text = self._text[:cut]
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._text) - self._held())

    def flush(self) -> str:
        """Release the held tail (generation ended for another reason)."""
        return self._release(len(self._text))

    def _held(self) -> int:
        """Length of the longest tail of the unsent text that is a proper prefix of a stop."""
        tail = self._text[self._sent:]
        for k in range(min(len(tail), self._longest - 1), 0, -1):
            end = tail[-k:]
            if any(s.startswith(end) for s in self.stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        out = self._text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return out
