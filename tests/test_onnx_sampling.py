"""The ONNX path's sampling (numpy) keeps exactly the tokens and probabilities transformers' warpers do."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.config import GenerateConfig
from finetune.onnx_generation import NUCLEUS_CANDIDATES, sampling_distribution


def transformers_distribution(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    row = torch.from_numpy(scores)[None]
    if top_k > 0:
        row = TopKLogitsWarper(top_k)(None, row)
    if top_p < 1.0:
        row = TopPLogitsWarper(top_p)(None, row)
    return torch.softmax(row, dim=-1)[0].numpy()


def rows(with_ties: bool, vocab: int = 5000):
    rng = np.random.default_rng(0)
    yield "flat", rng.normal(size=vocab)  # the best NUCLEUS_CANDIDATES hold little mass: full sort
    peaked = rng.normal(size=vocab)
    peaked[rng.choice(vocab, 40, replace=False)] += 12  # typical LM logits: a few tokens hold the mass
    yield "peaked", peaked
    heavy_tail = rng.normal(size=vocab) * 0.01  # 20 graded tokens hold ~40% of the mass, a long flat tail the rest
    heavy_tail[:20] = np.log(np.linspace(50, 250, 20))
    yield "heavy tail", heavy_tail
    if with_ties:  # top-k keeps every token tied with the k-th; which tie top-p drops is sort-order noise, in torch too
        yield "tied", np.round(rng.normal(size=vocab), 1)


@pytest.mark.parametrize(
    "top_k, top_p", [(50, 1.0), (50, 0.95), (0, 0.95), (0, 0.5), (0, 0.3), (0, 1.0), (3, 0.3), (0, 0.999)]
)
def test_sampling_distribution_matches_transformers_warpers(top_k, top_p):
    cfg = GenerateConfig(top_k=top_k, top_p=top_p)
    for name, scores in rows(with_ties=top_p == 1.0):
        ids, probs = sampling_distribution(scores, cfg)
        dense = np.zeros_like(scores)
        dense[ids] = probs
        np.testing.assert_allclose(dense, transformers_distribution(scores, top_k, top_p), atol=1e-12, err_msg=name)
        assert len(ids) == len(set(ids.tolist())) and abs(probs.sum() - 1) < 1e-12


def test_nucleus_prefilter_is_used_when_the_best_tokens_hold_the_mass(monkeypatch):
    sorted_sizes = []
    real_argsort = np.argsort
    monkeypatch.setattr(
        np, "argsort", lambda a, *args, **kwargs: sorted_sizes.append(np.size(a)) or real_argsort(a, *args, **kwargs)
    )
    scores = np.zeros(50257)
    scores[:10] = 20.0
    ids, _ = sampling_distribution(scores, GenerateConfig(top_k=0, top_p=0.9))
    assert sorted(ids.tolist()) == list(range(10))
    assert sorted_sizes == [NUCLEUS_CANDIDATES]  # the vocabulary itself was never sorted
    sampling_distribution(np.zeros(50257), GenerateConfig(top_k=0, top_p=0.9))  # flat: no shortcut
    assert sorted_sizes[-1] == 50257
