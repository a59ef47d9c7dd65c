"""Token ids -> text as it streams, cut at stop strings (`finetune generate`'s output and `finetune serve`'s).

Text that could still become a stop string, or that ends in half a UTF-8 character (byte-level BPE
splits characters across tokens), is held back until the next token settles it, so a client never
sees part of a stop string or a replacement character that a later token would have completed.
"""

from __future__ import annotations

from collections.abc import Callable


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Text up to (not including) the earliest stop string."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class TextStream:
    """Feed generated token ids one by one; read back the text that is safe to send."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode = decode
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False  # a stop string was seen: the text ends before it
        self.tokens_kept = 0  # tokens wholly before the cut (for logprobs)

    def _text(self) -> str:
        return self.decode(self.ids)

    def feed(self, token_id: int) -> str:
        """The new text this token makes safe to send ('' while it is held back or after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._text()
        before_stop = cut_at_stop(text, self.stops)
        if len(before_stop) < len(text):
            self.stopped = True
            self.tokens_kept = self._tokens_within(len(before_stop))
            return self._advance(before_stop)
        self.tokens_kept = len(self.ids)
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":  # half a character: the next token may complete it
            safe -= 1
        for stop in self.stops:  # a tail that may grow into a stop string waits
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k : safe] == stop[:k]:
                    safe -= k
                    break
        return self._advance(text[:safe])

    def finish(self) -> str:
        """What was held back, once the request has ended (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new

    def _tokens_within(self, chars: int) -> int:
        """How many leading tokens decode to at most `chars` characters."""
        kept = 0
        for i in range(1, len(self.ids) + 1):
            if len(self.decode(self.ids[:i])) > chars:
                break
            kept = i
        return kept
