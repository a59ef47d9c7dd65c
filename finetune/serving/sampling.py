"""Per-request token choice and logprobs on one row of logits, with the project's sampler.

The choice is onnx_generation.next_tokens (transformers' processor order: repetition penalty,
temperature, top-k, top-p) applied to this request's row with this request's generator, so a greedy
request gives `finetune generate --temperature 0`'s tokens and a seeded one the same tokens in any batch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from finetune.config import GenerateConfig
from finetune.onnx_generation import next_tokens
from finetune.serving.requests import Request


def sampler_config(request: Request) -> GenerateConfig:
    """The request's knobs in the form the shared sampler reads."""
    return GenerateConfig(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
    )


def choose(logits: np.ndarray, history: list[int], cfg: GenerateConfig, rng: np.random.Generator) -> int:
    """One token from one row of last-position logits; history: the request's prompt and tokens so far."""
    return int(next_tokens(logits[None], np.asarray(history, dtype=np.int64)[None], cfg, rng)[0])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, in float64 (stable: shifted by the maximum)."""
    scores = logits.astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def top_logprobs(row: np.ndarray, k: int) -> Optional[dict[int, float]]:
    """The k most likely token ids of one row of log-probabilities, best first; None when k is 0."""
    if k <= 0:
        return None
    k = min(k, row.size)
    best = np.argpartition(row, -k)[-k:]
    best = best[np.argsort(-row[best], kind="stable")]
    return {int(i): float(row[i]) for i in best}


def prompt_logprobs(
    prompt_ids: list[int], logits: np.ndarray, k: int
) -> tuple[list[Optional[float]], Optional[list[Optional[dict[int, float]]]]]:
    """Each prompt token's logprob given the tokens before it (first: None), and the k best at each position.

    logits: the prefill's logits at every prompt position, shape (len(prompt_ids), vocab).
    """
    scored = log_softmax(logits[:-1])  # position i predicts token i + 1
    targets = np.asarray(prompt_ids[1:], dtype=np.int64)
    values = scored[np.arange(len(targets)), targets]
    logprobs: list[Optional[float]] = [None, *(float(v) for v in values)]
    tops = None
    if k > 0:
        tops = [None, *(top_logprobs(row, k) for row in scored)]
    return logprobs, tops
