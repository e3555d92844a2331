"""torchmetrics Metric classes, each with a functional twin (added by the analysis issues)."""

from lit_attrib.metrics.answers import (
    MultipleChoiceAccuracy,
    PassAtOne,
    extract_answer,
    grade_answers,
    multiple_choice_accuracy,
    normalize_number,
    pass_at_one,
)
from lit_attrib.metrics.memorization import Memorization, NDCGAtK, memorization_scores, ndcg_at_k

__all__ = [
    "Memorization", "MultipleChoiceAccuracy", "NDCGAtK", "PassAtOne", "extract_answer", "grade_answers",
    "memorization_scores", "multiple_choice_accuracy", "ndcg_at_k", "normalize_number", "pass_at_one",
]
