"""Memorization and nDCG@k against hand computations and explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from lit_attrib.metrics import Memorization, NDCGAtK, memorization_scores, ndcg_at_k


def test_memorization_on_crafted_cases():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    predicted = torch.tensor([[1, 2, 3, 4],    # exact: d = 0
                              [1, 2, 9, 4],    # one substitution: d/L = 0.25 -> loose (0.75 >= 0.75)
                              [2, 3, 4, 9],    # a shift: delete 1, insert 9 -> d/L = 0.5
                              [0, 0, 0, 0]])   # nothing: d/L = 1
    scores = memorization_scores(predicted, reference)
    assert scores["strict"].tolist() == [True, False, False, False]
    assert scores["distance"].tolist() == [0.0, 0.25, 0.5, 1.0]
    assert scores["loose"].tolist() == [True, True, False, False]
    metric = Memorization()
    metric.update(predicted[:2], reference[:2])
    metric.update(predicted[2:], reference[2:])
    result = metric.compute()
    assert float(result["strict_accuracy"]) == 0.25 and float(result["loose_accuracy"]) == 0.5
    assert float(result["distance"]) == pytest.approx(1.75 / 4)
    assert memorization_scores(predicted, reference, loose_threshold=0.5)["loose"].tolist() == [True, True, True, False]


def explicit_ndcg(edited: list[float], baseline: list[float], k: int) -> float:
    """A loop over ranks with dictionaries, as one would write it by hand."""
    base_order = sorted(range(len(baseline)), key=lambda t: -baseline[t])[:k]
    relevance = {token: k - rank for rank, token in enumerate(base_order)}
    edit_order = sorted(range(len(edited)), key=lambda t: -edited[t])[:k]
    dcg = sum(relevance.get(token, 0) / math.log2(rank + 2) for rank, token in enumerate(edit_order))
    ideal = sum((k - rank) / math.log2(rank + 2) for rank in range(k))
    return dcg / ideal


def test_ndcg_equals_an_explicit_loop():
    generator = torch.Generator().manual_seed(0)
    baseline = torch.randn(6, 20, dtype=torch.float64, generator=generator)
    edited = baseline + 0.7 * torch.randn(6, 20, dtype=torch.float64, generator=generator)
    for k in (1, 3, 10):
        expected = torch.tensor([explicit_ndcg(e.tolist(), b.tolist(), k) for e, b in zip(edited, baseline)],
                                dtype=torch.float64)
        torch.testing.assert_close(ndcg_at_k(edited, baseline, k), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ndcg_at_k(baseline, baseline, 5), torch.ones(6, dtype=torch.float64))
    metric = NDCGAtK(k=3)
    mask = torch.tensor([True, True, False, True, False, True])
    metric.update(edited, baseline, mask=mask)
    assert float(metric.compute()) == pytest.approx(float(ndcg_at_k(edited, baseline, 3)[mask].mean()))


def test_bad_metric_input_is_refused():
    with pytest.raises(ValueError, match="must both be"):
        memorization_scores(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="k must be between 1"):
        ndcg_at_k(torch.zeros(2, 5), torch.zeros(2, 5), 6)
