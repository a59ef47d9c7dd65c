"""What goes into the serving engine and what comes out: the request, its events, its handle, the errors.

Plain dataclasses and numpy only (no torch), so the ONNX serving path stays torch-free.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from numbers import Integral
from typing import Optional, Union

from finetune.errors import FinetuneError

# OpenAI's completions API caps logprobs at 5; lm-eval asks for at most that. 20 leaves room.
MAX_LOGPROBS = 20


class RequestError(FinetuneError):
    """A request the engine refuses (a bad field, a prompt too long): the HTTP layer answers 400 naming `param`."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class QueueFull(FinetuneError):
    """max_queue requests already wait: the HTTP layer answers 429 with Retry-After."""


class EngineStopped(FinetuneError):
    """The engine is shutting down (or has stopped) and takes no new requests: 503."""


@dataclass
class Request:
    """One completion to compute, in token ids (the HTTP layer tokenizes and detokenizes)."""

    prompt_ids: list[int]  # at least one token
    max_tokens: int = 16  # new tokens at most; 0 with echo_logprobs scores the prompt only
    temperature: float = 1.0  # 0 means greedy (argmax), honoured as such
    top_p: float = 1.0  # nucleus mass (1 disables)
    top_k: int = 0  # keep the k most likely tokens (0 disables)
    repetition_penalty: float = 1.0  # >1 discourages repeats (transformers' rule)
    seed: Optional[int] = None  # a per-request generator: the same tokens whatever else is in the batch
    logprobs: Optional[int] = None  # None: no logprobs; k: each token's logprob and the k best alternatives
    echo_logprobs: bool = False  # also score the prompt tokens (lm-eval's loglikelihood)

    def check(self, context: Optional[int], vocab_size: Optional[int] = None) -> None:
        """Raise RequestError naming the field (and the limit) that makes this request impossible."""
        if not self.prompt_ids:
            raise RequestError("the prompt is empty: pass at least one token", "prompt")
        ids_ok = all(isinstance(i, Integral) and not isinstance(i, bool) for i in self.prompt_ids)  # numpy ints too
        if not ids_ok or (vocab_size and not all(0 <= i < vocab_size for i in self.prompt_ids)):
            limit = f" from 0 to {vocab_size - 1}" if vocab_size else ""
            raise RequestError(f"the prompt must be integer token ids{limit} (the vocabulary)", "prompt")
        integral = isinstance(self.max_tokens, Integral) and not isinstance(self.max_tokens, bool)
        if not integral or self.max_tokens < 0:
            raise RequestError(f"max_tokens must be a non-negative integer, not {self.max_tokens!r}", "max_tokens")
        if self.max_tokens == 0 and not self.echo_logprobs:
            raise RequestError("max_tokens must be at least 1 (0 only with echo and logprobs)", "max_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestError(f"temperature must be >= 0, not {self.temperature!r}", "temperature")
        if not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p!r}", "top_p")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), not {self.top_k!r}", "top_k")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RequestError(f"repetition_penalty must be > 0, not {self.repetition_penalty!r}", "repetition_penalty")
        if self.seed is not None and not (isinstance(self.seed, Integral) and self.seed >= 0):
            raise RequestError(f"seed must be a non-negative integer, not {self.seed!r}", "seed")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, not {self.logprobs!r}", "logprobs")
        if context and len(self.prompt_ids) + self.max_tokens > context:
            raise RequestError(
                f"prompt ({len(self.prompt_ids)} tokens) + max_tokens ({self.max_tokens}) exceeds the model's "
                f"context of {context} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
            )


@dataclass
class PromptEvent:
    """The prompt's own logprobs (echo_logprobs): entry i scores prompt token i given tokens before it.

    The first token has no context, so its entries are None (as OpenAI's echo answers null).
    """

    token_ids: list[int]
    logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[int, float]]]]  # None unless request.logprobs > 0


@dataclass
class TokenEvent:
    """One generated token. Logprobs come from the model's distribution (before temperature/top-k/top-p)."""

    token_id: int
    logprob: Optional[float] = None  # None unless request.logprobs is set
    top_logprobs: Optional[dict[int, float]] = None  # token id -> logprob, the request.logprobs best


@dataclass
class FinalEvent:
    """The last event of every request.

    finish_reason: "stop" (EOS), "length" (max_tokens), "cancelled" (handle.cancel() or shutdown past the
    grace period), "error" (the backend failed; `error` says why).
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


Event = Union[PromptEvent, TokenEvent, FinalEvent]


@dataclass(eq=False)  # handles compare by identity
class Handle:
    """A submitted request's events, as a blocking iterator or an async iterator (one consumer).

    The engine thread pushes; a consumer reads. An async consumer is woken through its event loop
    (call_soon_threadsafe), so a streaming HTTP response needs no thread of its own.
    """

    request: Request
    submitted_at: float
    _events: deque = field(default_factory=deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _async: Optional[tuple] = None  # (loop, asyncio.Queue) once an async consumer started
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """Give up this request (a client disconnected): the engine frees its slot at the next step."""
        self.cancelled = True

    def push(self, event: Event) -> None:
        """Called by the engine thread."""
        with self._ready:
            if isinstance(event, FinalEvent):
                self.done = True
            if self._async is not None:
                loop, queue = self._async
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the consumer's loop has closed: nobody is listening any more
                    self.cancelled = True
            else:
                self._events.append(event)
                self._ready.notify_all()

    def next_event(self, timeout: Optional[float] = None) -> Event:
        """The next event, waiting for it; TimeoutError after `timeout` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._events, timeout):
                raise TimeoutError("no event from the engine in time")
            return self._events.popleft()

    def __iter__(self):
        while True:
            event = self.next_event()
            yield event
            if isinstance(event, FinalEvent):
                return

    async def __aiter__(self):
        with self._ready:
            if self._async is None:
                queue: asyncio.Queue = asyncio.Queue()
                for event in self._events:  # what arrived before the consumer started
                    queue.put_nowait(event)
                self._events.clear()
                self._async = (asyncio.get_running_loop(), queue)
        queue = self._async[1]
        while True:
            event = await queue.get()
            yield event
            if isinstance(event, FinalEvent):
                return

    def result(self, timeout: Optional[float] = None) -> tuple[list[TokenEvent], FinalEvent, Optional[PromptEvent]]:
        """Wait for the whole answer: (token events, final event, prompt event or None)."""
        tokens, prompt = [], None
        while True:
            event = self.next_event(timeout)
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, PromptEvent):
                prompt = event
            else:
                return tokens, event, prompt
