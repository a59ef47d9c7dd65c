"""The scheduler: one thread runs iteration-level ("continuous") batching over a backend.

Each turn of the loop admits waiting requests into free slots (prefilled together, left padded, each
sent its first token, then merged into the running batch's KV cache), runs one decode step for the
whole batch, and drops rows that finished or were cancelled at once, so their slots go to waiting
requests at the next turn.

A thread rather than an asyncio task: a step blocks for as long as the model runs (ONNX Runtime and
torch release the GIL meanwhile), and the HTTP event loop must keep answering (/health, 429s, SSE
writes) while it does. Handles hand events to the event loop thread-safely.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.serving.requests import (
    EngineStopped,
    FinalEvent,
    Handle,
    PromptEvent,
    QueueFull,
    Request,
    TokenEvent,
)
from finetune.serving.sampling import choose, log_softmax, prompt_logprobs, sampler_config, top_logprobs
from finetune.serving.stats import EngineStats

if TYPE_CHECKING:
    from finetune.config import GenerateConfig
    from finetune.serving.backend import Backend, Past


@dataclass
class _Row:
    """A request in the running batch: what it sampled so far and how to sample the next token."""

    handle: Handle
    cfg: GenerateConfig
    rng: np.random.Generator
    history: list[int]  # prompt, then generated tokens (what the repetition penalty looks at)
    generated: int = 0
    last_token_at: float = 0.0
    pending: Optional[int] = None  # sampled and sent, not yet fed to the model
    finish: Optional[str] = None  # set when the row must leave the batch
    error: Optional[str] = None  # why, when the backend failed


@dataclass
class _Batch:
    """The running batch: rows in order, their left-padded attention mask and the backend's past."""

    rows: list[_Row] = field(default_factory=list)
    mask: Optional[np.ndarray] = None  # (rows, length) of 0/1
    past: Past = None


# Newcomers prefilled in one forward hold at most this many (padded) tokens: one pass over the weights
# for a burst of short prompts, with the padding waste and the activation memory bounded.
PREFILL_TOKENS = 2048


def fill_from_tail(keep: list[int]) -> list[int]:
    """The rows to keep, ordered to move the fewest: a row already within the kept count stays in its place,
    and the last rows take the places of rows that leave (an in-place KV cache copies one row per gap, where
    keeping the order would shift every row below the first gap)."""
    count = len(keep)
    movers = iter(reversed([row for row in keep if row >= count]))
    kept = set(keep)
    return [place if place in kept else next(movers) for place in range(count)]


def prefill_groups(handles: list[Handle]) -> list[list[Handle]]:
    """Newcomers in arrival order, grouped for prefill: an echo request alone (it keeps every position's
    logits), the others together while the group's padded size stays within PREFILL_TOKENS."""
    groups: list[list[Handle]] = []
    width = 0
    for handle in handles:
        length = len(handle.request.prompt_ids)
        alone = handle.request.echo_logprobs
        last = groups[-1] if groups else None
        fits = last is not None and not last[0].request.echo_logprobs and not alone
        if fits and max(width, length) * (len(last) + 1) <= PREFILL_TOKENS:
            last.append(handle)
            width = max(width, length)
        else:
            groups.append([handle])
            width = length
    return groups


class Engine:
    """Continuous batching over one backend, on its own thread.

    submit() from any thread (an HTTP handler); events arrive on the returned Handle.
    """

    def __init__(self, backend: Backend, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._waiting: deque[Handle] = deque()
        self._handles: dict[int, Handle] = {}  # submitted, not finished: queued, prefilling or decoding
        self._wake = threading.Condition()
        self._accepting = True
        self._exit = False
        self._batch = _Batch()
        self._thread = threading.Thread(target=self._loop, name="finetune-serve-engine", daemon=True)
        self._thread.start()

    # -- the API the HTTP layer calls ------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Queue a request; raises RequestError (400), QueueFull (429) or EngineStopped (503)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[Request]) -> list[Handle]:
        """Queue several requests (n > 1, a list of prompts) all together or none: the same errors as submit."""
        for request in requests:
            request.check(self.backend.context, self.backend.vocab_size)
        with self._wake:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            # Requests that a free batch slot will take at the next step do not count as waiting.
            in_flight = len(self._handles) - len(self._waiting)  # admitted, not finished (under this lock)
            free = max(0, self.max_batch_size - in_flight)
            if len(self._waiting) + len(requests) > self.max_queue + free:
                self.stats.rejected += len(requests)
                waiting = max(0, len(self._waiting) - free)
                raise QueueFull(
                    f"{waiting} requests already wait and {len(requests)} more do not fit "
                    f"(max_queue {self.max_queue}); retry later"
                )
            now = time.perf_counter()
            handles = [Handle(request, now) for request in requests]
            for handle in handles:
                self._waiting.append(handle)
                self._handles[id(handle)] = handle
            self.stats.submitted += len(handles)
            self.stats.queue_depth = len(self._waiting)
            self._wake.notify()
        return handles

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish within grace_s, cancel the rest, end the thread."""
        deadline = time.monotonic() + grace_s
        with self._wake:
            self._accepting = False
            self._wake.notify()
            self._wake.wait_for(self._idle, max(0.0, deadline - time.monotonic()))
            for handle in self._handles.values():
                handle.cancel()
            self._exit = True
            self._wake.notify()
        self._thread.join()

    @property
    def running(self) -> bool:
        """The decode thread is alive (False once stop() returned)."""
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        """submit() takes requests (False from the moment stop() is called: answer 503)."""
        return self._accepting and self.running

    # -- the loop --------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not self._handles

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._exit or self._waiting or self._batch.rows)
                if self._exit and self._idle():
                    return
                # Cancelled requests leave the queue at once, so they hold no place in max_queue.
                dropped = [h for h in self._waiting if h.cancelled]
                admitted = [h for h in self._waiting if not h.cancelled]
                free = self.max_batch_size - len(self._batch.rows)
                admitted, rest = admitted[:free], admitted[free:]
                self._waiting = deque(rest)
                self.stats.queue_depth = len(self._waiting)
            for handle in dropped:
                self._finish(handle, "cancelled")
            try:
                self._turn(admitted)
            except Exception as exc:  # a bug must not strand clients: end the batch, keep serving
                for row in self._batch.rows:
                    self._finish(row, "error", str(exc))
                for handle in admitted:  # those not in the batch yet (finished ones are skipped)
                    self._finish(handle, "error", str(exc))
                self._batch = _Batch()
                self._gauge()
            with self._wake:
                self._wake.notify_all()  # stop() waits for the engine to fall idle

    def _turn(self, admitted: list[Handle]) -> None:
        """Admit newcomers, run one decode step, let finished rows leave."""
        decoding = bool(self._batch.rows)
        self._admit(admitted, decoding)
        self._leave()
        if self._batch.rows:
            self._step()
            self._leave()

    def _finish(self, row_or_handle, reason: str, error: Optional[str] = None) -> None:
        handle = row_or_handle.handle if isinstance(row_or_handle, _Row) else row_or_handle
        if handle.done:  # one final event per request, whatever path ends it
            return
        generated = row_or_handle.generated if isinstance(row_or_handle, _Row) else 0
        handle.push(FinalEvent(reason, len(handle.request.prompt_ids), generated, error))
        self.stats.count_finished(reason)
        with self._wake:
            self._handles.pop(id(handle), None)

    def _admit(self, handles: list[Handle], decoding: bool) -> None:
        """Prefill newcomers (together where they can be), send each its first token, merge those that go on."""
        live = []
        for handle in handles:
            if handle.cancelled:
                self._finish(handle, "cancelled")
            else:
                live.append(handle)
        for group in prefill_groups(live):
            requests = [h.request for h in group]
            try:
                logits, past = self.backend.prefill([r.prompt_ids for r in requests], requests[0].echo_logprobs)
            except Exception as exc:  # a backend failure ends these requests, never the engine
                for handle in group:
                    self._finish(handle, "error", str(exc))
                continue
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
            rows = [self._start(handle, logits[i]) for i, handle in enumerate(group)]
            kept = [i for i, row in enumerate(rows) if row is not None]
            if kept:
                self.stats.joined_while_decoding += len(kept) if decoding else 0
                width = max(len(r.prompt_ids) for r in requests)
                self._merge([rows[i] for i in kept], past, np.array(kept), width)

    def _start(self, handle: Handle, logits: np.ndarray) -> Optional[_Row]:
        """Echo the prompt's logprobs, send the first token; the request's row when it goes on decoding."""
        request = handle.request
        if request.echo_logprobs:  # prefilled alone: logits holds every prompt position
            logprobs, tops = prompt_logprobs(request.prompt_ids, logits, request.logprobs or 0)
            handle.push(PromptEvent(list(request.prompt_ids), logprobs, tops))
        rng = np.random.default_rng(request.seed)
        row = _Row(handle, sampler_config(request), rng, list(request.prompt_ids))
        if request.max_tokens == 0:
            self._finish(row, "length")
            return None
        try:
            self._emit(row, logits[-1])
        except Exception as exc:
            row.finish, row.error = "error", str(exc)
        if row.finish:
            self._finish(row, row.finish, row.error)
            return None
        return row

    def _merge(self, rows: list[_Row], past: Past, kept: np.ndarray, prefill_width: int) -> None:
        """Add prefilled rows (rows `kept` of a left-padded prefill batch `prefill_width` wide) to the batch."""
        lengths = [len(row.handle.request.prompt_ids) for row in rows]
        width = max(lengths)
        past = self.backend.select(past, kept, prefill_width - width)
        mask = np.array([[0] * (width - n) + [1] * n for n in lengths], np.int64)
        batch = self._batch
        if not batch.rows:
            self._batch = _Batch(rows, mask, past)
        else:
            full = max(batch.mask.shape[1], width)
            batch.mask = np.concatenate([np.pad(m, ((0, 0), (full - m.shape[1], 0))) for m in (batch.mask, mask)])
            batch.past = self.backend.combine([batch.past, past])
            batch.rows.extend(rows)
        self._gauge()

    def _emit(self, row: _Row, logits: np.ndarray) -> None:
        """Sample the row's next token from its last-position logits and send it (EOS ends the row unsent)."""
        token = choose(logits, row.history, row.cfg, row.rng)
        now = time.perf_counter()
        if token == self.backend.eos_token_id:
            row.finish = "stop"
            return
        request = row.handle.request
        event = TokenEvent(token)
        if request.logprobs is not None:
            scored = log_softmax(logits)
            event.logprob = float(scored[token])
            event.top_logprobs = top_logprobs(scored, request.logprobs)
        row.handle.push(event)
        self.stats.observe_token(now - (row.last_token_at or row.handle.submitted_at), first=row.generated == 0)
        row.generated += 1
        row.history.append(token)
        row.last_token_at = now
        row.pending = token
        if row.generated >= request.max_tokens:
            row.finish = "length"

    def _step(self) -> None:
        batch = self._batch
        tokens = np.array([row.pending for row in batch.rows], dtype=np.int64)
        mask = np.concatenate([batch.mask, np.ones((len(batch.rows), 1), np.int64)], axis=1)
        try:
            logits, batch.past = self.backend.step(tokens, mask, batch.past)
        except Exception as exc:  # the whole batch failed; the engine keeps serving
            for row in batch.rows:
                row.finish, row.error = "error", str(exc)
            return
        batch.mask = mask
        self.stats.steps += 1
        for row, row_logits in zip(batch.rows, logits):
            try:
                self._emit(row, row_logits)
            except Exception as exc:  # e.g. NaN logits in this row: this request ends, the others go on
                row.finish, row.error = "error", str(exc)

    def _leave(self) -> None:
        """Drop finished and cancelled rows, and the leading columns no remaining row uses."""
        batch = self._batch
        for row in batch.rows:
            if row.finish is None and row.handle.cancelled:
                row.finish = "cancelled"
        keep = [i for i, row in enumerate(batch.rows) if row.finish is None]
        if len(keep) == len(batch.rows):
            return
        for row in batch.rows:
            if row.finish is not None:
                self._finish(row, row.finish, row.error)
        if not keep:
            self._batch = _Batch()
        else:
            order = fill_from_tail(keep)
            mask = batch.mask[order]
            start = int(np.argmax(mask.any(axis=0)))  # the first column some remaining row uses
            self._batch = _Batch(
                [batch.rows[i] for i in order], mask[:, start:], self.backend.select(batch.past, np.array(order), start)
            )
        self._gauge()

    def _gauge(self) -> None:
        self.stats.batch_size = len(self._batch.rows)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, self.stats.batch_size)
