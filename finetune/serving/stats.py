"""Counters and gauges of the serving engine, for the HTTP layer to export (Prometheus, logs).

Plain numbers and bounded sample buffers; the engine thread writes, any thread reads. Latency
samples are taken (drained) by whoever turns them into histograms.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, fields

SAMPLES_KEPT = 100_000  # per buffer: bounded, so an exporter that never drains them cannot grow memory


@dataclass
class EngineStats:
    """What the engine has done so far, and what it is doing now."""

    submitted: int = 0  # requests accepted into the queue
    rejected: int = 0  # requests refused with QueueFull
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> requests
    prompt_tokens: int = 0  # prompt tokens prefilled
    tokens_generated: int = 0  # tokens sent to clients
    steps: int = 0  # batched decode steps run
    joined_while_decoding: int = 0  # requests merged into a batch that was already decoding
    queue_depth: int = 0  # gauge: requests waiting for a slot
    batch_size: int = 0  # gauge: requests in the running batch
    max_batch_size_seen: int = 0  # the largest running batch so far
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))  # submit -> first token
    token_latency_s: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))  # between a request's tokens
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_token(self, seconds: float, first: bool) -> None:
        with self._lock:
            self.tokens_generated += 1
            (self.ttft_s if first else self.token_latency_s).append(seconds)

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished = {**self.finished, reason: self.finished.get(reason, 0) + 1}  # readers see whole dicts

    def snapshot(self) -> dict:
        """The counters and gauges (not the samples) as a plain dict, read consistently."""
        with self._lock:
            return {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.name not in ("ttft_s", "token_latency_s", "_lock")
            }

    def take_samples(self) -> tuple[list[float], list[float]]:
        """The time-to-first-token and per-token latency samples since the last call (and forget them)."""
        with self._lock:
            ttft, per_token = list(self.ttft_s), list(self.token_latency_s)
            self.ttft_s.clear()
            self.token_latency_s.clear()
        return ttft, per_token
