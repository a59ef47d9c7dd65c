"""The ONNX Runtime serving backend: an export made by `finetune export --format onnx`, numpy only.

Imports no torch and no transformers (a serving image needs neither); the graph already takes a
batch, an attention mask, position ids and past key/values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.onnx_generation import position_ids_for
from finetune.onnx_kv_cache import SharedKV
from finetune.onnx_quantize import batch_invariant
from finetune.serving.backend import left_padded

if TYPE_CHECKING:
    from finetune.onnx_generation import OnnxCausalLM


class OnnxBackend:
    """Prefill and batched decode steps on an exported decoder (OnnxCausalLM)."""

    name = "onnx"

    def __init__(self, lm: OnnxCausalLM):
        self.lm = lm
        self.eos_token_id = lm.eos_token_id
        self.context: Optional[int] = lm.max_positions
        self.vocab_size = lm.tokenizer.get_vocab_size()
        # int8 exports quantize each row's activations on their own; exports made before that did not.
        self.batch_invariant = batch_invariant(lm.manifest.get("quantization"))

    @classmethod
    def load(cls, directory: str | Path) -> OnnxBackend:
        from finetune.onnx_generation import OnnxCausalLM

        return cls(OnnxCausalLM(directory))

    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.lm.decode(ids)

    def prefill(self, prompts: list[list[int]], all_logits: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        ids, mask, positions = left_padded(prompts, self.lm.pad_token_id)
        return self.lm.forward(ids, mask, positions, self.lm.empty_past(len(prompts)), last_only=not all_logits)

    def step(self, tokens: np.ndarray, mask: np.ndarray, past: list[np.ndarray]):
        mask = mask.astype(np.int64)
        logits, past = self.lm.forward(tokens.astype(np.int64)[:, None], mask, position_ids_for(mask, 1), past)
        return logits[:, -1], past

    def combine(self, pasts: list[list[np.ndarray]] | list[SharedKV]) -> list[np.ndarray] | SharedKV:
        if isinstance(pasts[0], SharedKV):  # rows of different lengths need no padding: append the others' rows
            joined = pasts[0]
            for past in pasts[1:]:
                joined = joined.extend(past)
            return joined
        width = max(p[0].shape[2] for p in pasts)
        layers = []
        for arrays in zip(*pasts):  # each part copied once, right-aligned into a zeroed batch
            _, heads, _, dim = arrays[0].shape
            joined = np.zeros((sum(a.shape[0] for a in arrays), heads, width, dim), arrays[0].dtype)
            row = 0
            for a in arrays:
                joined[row : row + a.shape[0], :, width - a.shape[2] :] = a
                row += a.shape[0]
            layers.append(joined)
        return layers

    def select(self, past: list[np.ndarray] | SharedKV, rows: np.ndarray, start: int) -> list[np.ndarray] | SharedKV:
        if isinstance(past, SharedKV):  # no padding columns to cut; the kept rows move up in place
            return past.keep(rows)
        # A contiguous copy: ONNX Runtime copies non-contiguous inputs anyway, once per step.
        return [np.ascontiguousarray(a[rows, :, start:]) for a in past]
