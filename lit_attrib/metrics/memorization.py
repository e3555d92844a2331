"""Seed 003's memorization and ranking metrics: greedy-suffix memorization and nDCG@k against a baseline.

Each is a torchmetrics ``Metric`` (states summed across processes) with a functional twin that gives
the per-example values.
"""

from __future__ import annotations

import torch
from rapidfuzz.distance import Levenshtein
from torchmetrics import Metric

__all__ = ["Memorization", "NDCGAtK", "memorization_scores", "ndcg_at_k"]


def memorization_scores(predicted: torch.Tensor, reference: torch.Tensor,
                        loose_threshold: float = 0.75) -> dict[str, torch.Tensor]:
    """Per-example memorization of a suffix: ``predicted`` and ``reference`` token ids ``(B, L)``.

    Returns ``strict`` (every token equal), ``distance`` (token-level Levenshtein distance ``d / L``)
    and ``loose`` (``1 − d / L ≥ loose_threshold``), each ``(B,)``.
    """
    if predicted.shape != reference.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {tuple(predicted.shape)} and reference {tuple(reference.shape)} must both be "
                         f"(batch, suffix_len)")
    length = max(1, reference.shape[1])
    distances = torch.tensor([Levenshtein.distance(p, r) / length
                              for p, r in zip(predicted.tolist(), reference.tolist())], dtype=torch.float64)
    return {"strict": (predicted == reference).all(1).cpu(), "distance": distances,
            "loose": 1.0 - distances >= loose_threshold}


class Memorization(Metric):
    """Strict accuracy, loose accuracy and mean normalised edit distance of greedy suffixes.

    ``update(predicted, reference)`` with token ids ``(B, suffix_len)``; ``compute()`` returns
    ``{"strict_accuracy", "loose_accuracy", "distance", "count"}`` over every example seen (all processes).
    """

    full_state_update = False

    def __init__(self, loose_threshold: float = 0.75, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= loose_threshold <= 1.0:
            raise ValueError(f"loose_threshold must be in [0, 1]; got {loose_threshold}")
        self.loose_threshold = loose_threshold
        for name in ("strict", "loose", "distance", "total"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, reference: torch.Tensor) -> None:
        scores = memorization_scores(predicted, reference, self.loose_threshold)
        self.strict += scores["strict"].double().sum().to(self.strict.device)
        self.loose += scores["loose"].double().sum().to(self.loose.device)
        self.distance += scores["distance"].sum().to(self.distance.device)
        self.total += float(predicted.shape[0])

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1)
        return {"strict_accuracy": self.strict / total, "loose_accuracy": self.loose / total,
                "distance": self.distance / total, "count": self.total}


def ndcg_at_k(edited_logits: torch.Tensor, baseline_logits: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k of the edited model's top-k next tokens against the baseline's, per position ``(N,)``.

    The baseline's top-k token at rank ``r`` (0-based) has relevance ``k − r``; any other token 0. The
    edited model's ranking scores ``DCG = Σ_r rel(edited_r) / log₂(r + 2)``, normalised by the ideal
    ``Σ_r (k − r) / log₂(r + 2)`` (the edited ranking equal to the baseline's). Seed 003's text speaks
    of the baseline rank's relevance; this is the standard graded nDCG with that relevance.
    """
    if edited_logits.shape != baseline_logits.shape:
        raise ValueError(f"edited {tuple(edited_logits.shape)} and baseline {tuple(baseline_logits.shape)} logits "
                         f"must have the same shape")
    if not 1 <= k <= edited_logits.shape[-1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {edited_logits.shape[-1]}; got {k}")
    edited = edited_logits.reshape(-1, edited_logits.shape[-1]).topk(k, -1).indices
    baseline = baseline_logits.reshape(-1, baseline_logits.shape[-1]).topk(k, -1).indices
    ranks = torch.arange(k, device=edited.device)
    relevance = ((edited[:, :, None] == baseline[:, None, :]) * (k - ranks)[None, None, :]).sum(-1).double()
    discount = torch.log2(ranks.double() + 2)
    ideal = ((k - ranks).double() / discount).sum()
    return (relevance / discount).sum(-1) / ideal


class NDCGAtK(Metric):
    """Mean :func:`ndcg_at_k` over every position seen: ``update(edited_logits, baseline_logits, mask=None)``
    with logits ``(..., V)`` and an optional boolean ``mask`` of the positions to count."""

    full_state_update = False

    def __init__(self, k: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        self.k = k
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, edited_logits: torch.Tensor, baseline_logits: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        scores = ndcg_at_k(edited_logits, baseline_logits, self.k)
        if mask is not None:
            scores = scores[mask.reshape(-1).bool()]
        self.score += scores.sum()
        self.total += float(scores.numel())

    def compute(self) -> torch.Tensor:
        return self.score / self.total.clamp(min=1)
