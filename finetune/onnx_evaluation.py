"""`finetune eval --onnx`: the loss of an ONNX export on the data, with ONNX Runtime and numpy only (no torch).

The export's graph takes a prompt with an empty KV cache and returns logits for every position, so a window
of tokens is one forward pass; the next-token losses are computed here as torch's cross-entropy computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.errors import FinetuneError
from finetune.eval_data import BareTokenizer, EvalData, batches_of_windows, window_ids, windows
from finetune.perplexity import Score

if TYPE_CHECKING:
    from finetune.onnx_generation import OnnxCausalLM

CONTEXT_WHEN_UNKNOWN = 1024  # an export whose manifest does not say how many positions the model has


def load_export(directory: str) -> tuple[OnnxCausalLM, BareTokenizer]:
    """The export (every file checked, one line for a missing or damaged one) and its tokenizer for reading data."""
    from finetune.onnx_generation import OnnxCausalLM

    lm = OnnxCausalLM(directory)
    return lm, BareTokenizer(lm.tokenizer, lm.eos_token_id, lm.bos_token_id)


def context_of(lm: OnnxCausalLM) -> int:
    return lm.max_positions or CONTEXT_WHEN_UNKNOWN


def trained_block_size(lm: OnnxCausalLM) -> Optional[int]:
    """The block size the exported checkpoint was trained with, as the export's manifest records it."""
    size = lm.manifest.get("training_block_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position: logits (rows, vocab), targets (rows,), in float64."""
    logits = logits.astype(np.float32, copy=False)
    top = logits.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]
    return log_sum - logits[np.arange(len(targets)), targets]


def score_onnx(lm: OnnxCausalLM, data: EvalData, block_size: int, stride: int, batch_size: int) -> Score:
    """Summed loss and tokens scored over the windows of the data's token stream."""
    from finetune.onnx_generation import position_ids_for

    if data.supervised:
        raise FinetuneError(
            "--onnx evaluates plain text; evaluate prompt/completion or chat data with --checkpoint or --model"
        )
    score = Score()
    for batch in batches_of_windows(windows(len(data.stream), block_size, stride), batch_size):
        ids = window_ids(data.stream, batch)
        mask = np.ones_like(ids)
        logits, _ = lm.forward(ids, mask, position_ids_for(mask, ids.shape[1]), lm.empty_past(len(ids)))
        for row, window in enumerate(batch):
            # Position j - 1 predicts token j; the window scores positions first.. of its tokens.
            nll = token_nll(logits[row, window.first - 1 : -1], ids[row, window.first :])
            score.add(float(nll.sum()), window.scored)
    return score
