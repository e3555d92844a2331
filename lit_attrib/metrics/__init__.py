"""torchmetrics Metric classes, each with a functional twin (added by the analysis issues)."""

from lit_attrib.metrics.memorization import Memorization, NDCGAtK, memorization_scores, ndcg_at_k

__all__ = ["Memorization", "NDCGAtK", "memorization_scores", "ndcg_at_k"]
