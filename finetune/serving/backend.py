"""The small interface a serving backend implements (ONNX Runtime or torch), and its numpy helpers.

A backend runs the model; the engine owns the batch. The engine keeps each row's attention mask
(numpy, left padded: a row's real tokens always end at the last column) and hands the backend an
opaque `past` (per-layer key/value arrays of shape (batch, heads, length, head_dim), or buffers the
backend grows in place) to grow, combine and cut. Each past is used once: step, combine and select
may change the past they are given and return it.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np

from finetune.onnx_generation import position_ids_for

Past = Any  # a backend's per-layer key/value arrays, batch first


class Backend(Protocol):
    name: str  # "onnx" or "torch", for logs and metrics labels
    eos_token_id: int
    context: Optional[int]  # the longest prompt + completion the model takes; None when unknown
    vocab_size: int  # token ids a prompt may hold: 0 to vocab_size - 1
    # A row's logits do not depend on the other rows of its batch, so greedy output is the same alone or
    # batched. False for dynamic int8 (one activation scale for the whole batch) and GPU kernels.
    batch_invariant: bool

    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids, as `finetune generate` encodes it (an empty prompt -> [BOS])."""

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens skipped."""

    def prefill(self, prompts: list[list[int]], all_logits: bool) -> tuple[np.ndarray, Past]:
        """Run prompts together, left padded to the longest (width W): logits (len(prompts), W if all_logits
        else 1, vocab) and their past, W long."""

    def step(self, tokens: np.ndarray, mask: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """One decode step: tokens (batch,), mask (batch, past length + 1) -> logits (batch, vocab), new past."""

    def combine(self, pasts: list[Past]) -> Past:
        """Several pasts as one batch: each left-padded (with zeros) to the longest, rows in order."""

    def select(self, past: Past, rows: np.ndarray, start: int) -> Past:
        """Only `rows`, row rows[i] as row i (any order), and only the columns from `start` on (columns that
        are padding in every kept row)."""


def left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and position ids of prompts left padded to the longest (int64 arrays)."""
    width = max(len(p) for p in prompts)
    ids = np.array([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return ids, mask, position_ids_for(mask, width)
