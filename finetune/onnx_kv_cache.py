"""The KV cache of exports whose attention is ONNX Runtime's GroupQueryAttention: buffers that only grow.

A fused export's attention (MultiHeadAttention) copies the whole past into a new `present` tensor at
every decode step, and a serving batch that gains or loses a row must copy every other row's past as
well. GroupQueryAttention instead takes one buffer per layer and key/value, (rows, heads, room, dim),
with each row's filled length (`seqlens_k`): when the graph's present output is bound to the same
memory as its past input, a step writes the new token's key and value in place and attends over each
row's own length only, so rows of different lengths need no padding. A batch-16 decode step of GPT-2
124M int8 on 2 CPU cores took 17.5-18.5 ms this way against 21-22 ms with MultiHeadAttention.

OnnxCausalLM keeps its left-padded calling convention for every caller; this module turns a left-padded
block of new tokens into the right-padded rows the operator expects and the logits back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Positions added whenever a buffer grows, so that most steps write into room already there.
SPARE_POSITIONS = 64


@dataclass
class SharedKV:
    """The past of a GroupQueryAttention export: row b holds its first lengths[b] positions.

    The buffers have room for more rows and positions than are used; rows [0, len(lengths)) are the
    batch, in order. forward() appends in place and returns this same object: a past is used once.
    """

    buffers: list[np.ndarray]  # per graph past input: (row room, heads, position room, head dim)
    lengths: np.ndarray  # int64, one per row of the batch

    @classmethod
    def empty(cls, shapes: list[tuple[int, int]], rows: int, dtype) -> SharedKV:
        """No positions yet for `rows` rows; shapes holds (heads, head dim) per past input."""
        return cls([np.zeros((rows, heads, 0, dim), dtype) for heads, dim in shapes], np.zeros(rows, np.int64))

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def room(self) -> int:
        return self.buffers[0].shape[2]

    def views(self) -> list[np.ndarray]:
        """The batch's rows of each buffer: contiguous, so ONNX Runtime reads and writes them in place."""
        return [buffer[: self.rows] for buffer in self.buffers]

    def reserve(self, rows: int, positions: int, limit: int | None = None) -> None:
        """Make room for `rows` rows of `positions` positions (plus spare), copying the filled part once."""
        row_room, _, room, _ = self.buffers[0].shape
        if rows <= row_room and positions <= room:
            return
        if positions > room:
            room = positions + SPARE_POSITIONS
            if limit:  # no position past the model's context is ever written
                room = max(positions, min(room, limit))
        if rows > row_room:  # doubling: a batch that gains a row at a time copies itself log2(rows) times
            row_room = max(rows, 2 * row_room)
        filled = int(self.lengths.max(initial=0))
        grown = []
        for buffer in self.buffers:
            # Uninitialised: ONNX Runtime reads a row's first seqlens_k + 1 positions only, all written before
            # (zeroing cost a memset of every buffer, 84 MB for 16 rows, each time a batch grew).
            bigger = np.empty((row_room, buffer.shape[1], room, buffer.shape[3]), buffer.dtype)
            bigger[: self.rows, :, :filled] = buffer[: self.rows, :, :filled]
            grown.append(bigger)
        self.buffers = grown

    def keep(self, rows: np.ndarray) -> SharedKV:
        """Only `rows`, row rows[i] moved to place i: only rows that change place are copied (filled part)."""
        rows = np.asarray(rows, dtype=np.int64)
        moves = [(target, int(source)) for target, source in enumerate(rows) if target != source]
        written: set[int] = set()
        for target, source in moves:
            if source in written:  # an order that reads a place it already wrote: gather all at once
                for buffer in self.buffers:
                    buffer[: len(rows)] = buffer[rows]
                break
            written.add(target)
        else:
            for target, source in moves:
                filled = int(self.lengths[source])
                for buffer in self.buffers:
                    buffer[target, :, :filled] = buffer[source, :, :filled]
        self.lengths = self.lengths[rows]
        return self

    def extend(self, other: SharedKV) -> SharedKV:
        """`other`'s rows after this batch's rows (their filled parts copied once)."""
        start = self.rows
        self.reserve(start + other.rows, int(max(self.lengths.max(initial=0), other.lengths.max(initial=0))))
        filled = int(other.lengths.max(initial=0))
        for mine, theirs in zip(self.buffers, other.buffers):
            mine[start : start + other.rows, :, :filled] = theirs[: other.rows, :, :filled]
        self.lengths = np.concatenate([self.lengths, other.lengths])
        return self


@dataclass
class SharedFeed:
    """One forward's inputs for a GroupQueryAttention export, from a left-padded block of new tokens."""

    input_ids: np.ndarray  # (rows, n) int64, right padded
    position_ids: np.ndarray  # (rows, n) int64
    seqlens_k: np.ndarray  # (rows,) int32: each row's length after this block, minus one
    total_sequence_length: np.ndarray  # int32 scalar
    shift: np.ndarray  # (rows,) how far each row was moved left (its padding in the block)

    @classmethod
    def of(cls, input_ids: np.ndarray, attention_mask: np.ndarray, past: SharedKV, limit: int | None) -> SharedFeed:
        """input_ids (rows, n) left padded, attention_mask (rows, past + n) as OnnxCausalLM.forward takes them."""
        n = input_ids.shape[1]
        new = attention_mask[:, -n:].sum(axis=1).astype(np.int64)
        shift = n - new
        if n > 1 and shift.any() and past.lengths.any():
            # ONNX Runtime counts a padded block after a past as filled positions.
            raise ValueError("a padded block of several tokens needs an empty past")
        columns = np.arange(n)
        ids = input_ids if not shift.any() else np.take_along_axis(input_ids, (columns + shift[:, None]) % n, axis=1)
        positions = past.lengths[:, None] + columns
        if limit:  # padding past the context must still index the position table
            positions = np.minimum(positions, limit - 1)
        return cls(
            input_ids=np.ascontiguousarray(ids, dtype=np.int64),
            position_ids=positions.astype(np.int64),
            seqlens_k=(past.lengths + new - 1).astype(np.int32),
            total_sequence_length=np.array(int(past.lengths.max(initial=0)) + n, dtype=np.int32),
            shift=shift,
        )

    def last_positions(self) -> np.ndarray:
        """logits_positions for each row's last real token only: (rows, 1)."""
        return (self.input_ids.shape[1] - 1 - self.shift)[:, None].astype(np.int64)

    def all_positions(self) -> np.ndarray:
        """logits_positions for every position of the block: (rows, n)."""
        return np.broadcast_to(np.arange(self.input_ids.shape[1], dtype=np.int64), self.input_ids.shape).copy()

    def left_padded(self, logits: np.ndarray) -> np.ndarray:
        """Logits (rows, n, vocab) of the right-padded rows, put back where the caller's left-padded tokens were."""
        if not self.shift.any():
            return logits
        n = logits.shape[1]
        order = (np.arange(n) - self.shift[:, None]) % n
        return np.take_along_axis(logits, order[:, :, None], axis=1)
