"""Answer metrics of the evaluation harness: Pass@1 of generated final answers (GSM8K style) and
multiple-choice accuracy by answer score.

Final answers are compared as exact numbers, never as text: ``extract_answer`` finds the number a
generation or a GSM8K reference ends on (``"... #### 72"``) and ``normalize_number`` writes it in one
canonical form, so ``"$1,234.50"``, ``"1234.5"`` and ``"2469/2"`` are the same answer.

Each metric is a torchmetrics ``Metric`` (sum-reduced states, so processes add up) with a functional
twin; :func:`grade_answers` gives the per-item rows of a predictions file.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch
from torchmetrics import Metric

from lit_attrib.errors import DataError

__all__ = [
    "MultipleChoiceAccuracy", "PassAtOne", "extract_answer", "grade_answers", "multiple_choice_accuracy",
    "normalize_number", "pass_at_one",
]

ANSWER_MARKER = "####"
"""GSM8K's final-answer marker: a reference answer ends with ``#### <number>``."""

_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign
# A number: digits with optional thousands groups ("1,234") and decimals, or ".5"; then optionally
# "/<digits>" (a fraction). Not inside a word ("H2O", "x86") and not after a digit's hyphen ("3-4" is 3, 4).
_NUMBER = (r"(?P<sign>[" + _MINUS + r"])?\$?(?P<value>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
           r"(?:/(?P<denominator>\d+))?")
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])" + _NUMBER)
_NUMBER_ALONE = re.compile(r"\$?" + _NUMBER)
# What may surround a number on its own: quotes, brackets, markdown emphasis, units and sentence marks.
_SURROUNDING = " \t\r\n*_`'\"()[]{}<>,;:!?%"


def _canonical(value: Fraction) -> str:
    """One spelling per number: an integer ``"12"``, a terminating decimal ``"3.5"`` (no trailing zeros),
    else a reduced fraction ``"1/3"``."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:  # no finite decimal
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)  # the fewest decimals: value · 10^places is an integer not ending in 0
    digits = str(abs(value.numerator * (10**places // value.denominator))).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]  # exact at any length


def _value(match: re.Match) -> str | None:
    try:
        value = Fraction(Decimal(match["value"].replace(",", "")))
    except InvalidOperation:  # pragma: no cover - the pattern only admits decimal digits
        return None
    denominator = match["denominator"]
    if denominator is not None and int(denominator) != 0:  # "n/0" is no fraction: the number is n
        value /= int(denominator)
    if match["sign"]:
        value = -value
    return _canonical(value)


def normalize_number(text: str | None) -> str | None:
    """The canonical spelling of a number written on its own, or ``None`` if ``text`` is not one number.

    Accepted: an optional sign (``-`` or ``−``) and ``$``, digits with thousands separators (``1,234``) and
    decimals (``3.50``), and a fraction ``a/b`` (``3/4``). Surrounding quotes, brackets, markdown emphasis,
    ``%`` and sentence punctuation, and trailing periods, are ignored. Values are exact
    (:class:`decimal.Decimal` / :class:`fractions.Fraction`, never floats) and written as an integer
    (``"7.0"`` → ``"7"``), a decimal without trailing zeros (``"3.50"`` → ``"3.5"``; ``"3/4"`` →
    ``"0.75"``), or, when no finite decimal exists, a reduced fraction (``"2/6"`` → ``"1/3"``). ``-0`` is
    ``"0"``. A zero denominator is not a fraction (``"5/0"`` → ``"5"``).

    Examples:
        >>> normalize_number("$1,234.00."), normalize_number("-4"), normalize_number("12 apples")
        ('1234', '-4', None)
    """
    if text is None:
        return None
    stripped = str(text).strip(_SURROUNDING).rstrip(".").strip(_SURROUNDING)
    match = _NUMBER_ALONE.fullmatch(stripped)
    return _value(match) if match else None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a generation or a GSM8K reference, normalised (:func:`normalize_number`).

    The first number after the last ``####`` marker (GSM8K's final-answer format) if there is one, else
    the last number of the text; ``None`` when the text holds no number (such an answer is wrong, never
    an error). Numbers inside words (``H2O``) do not count; ``3-4`` is the numbers 3 and 4.

    Examples:
        >>> extract_answer("She has 3 + 4 = 7 apples.\\n#### 7"), extract_answer("so $1,200 in all.")
        ('7', '1200')
    """
    if not text:
        return None
    marker = text.rfind(ANSWER_MARKER)
    if marker >= 0:
        match = _NUMBER_IN_TEXT.search(text, marker + len(ANSWER_MARKER))
        if match is not None:
            return _value(match)
    last = None
    for last in _NUMBER_IN_TEXT.finditer(text):
        pass
    return _value(last) if last is not None else None


def grade_answers(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-item grading of generations against reference answers, for a predictions file.

    Returns one ``{"answer", "reference_answer", "correct"}`` per item: the extracted (normalised)
    answers and whether they are equal. A generation without a number is wrong (``answer`` None).

    Raises:
        ValueError: the lists differ in length.
        DataError: a reference answer holds no number (a GSM8K answer ends with ``#### <number>``).
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must have the same length; got {len(predictions)} "
                         f"predictions and {len(references)} references")
    rows = []
    for position, (prediction, reference) in enumerate(zip(predictions, references)):
        expected = extract_answer(reference)
        if expected is None:
            raise DataError(f"reference answer {position} of the batch has no number: {str(reference)[:120]!r}. Pass@1 "
                            f"compares final numbers; give references that end with '#### <number>' (GSM8K format)")
        answer = extract_answer(prediction)
        rows.append({"answer": answer, "reference_answer": expected, "correct": answer == expected})
    return rows


def _pass_at_one_update(predictions: list[str], references: list[str]) -> tuple[int, int]:
    graded = grade_answers(predictions, references)
    return sum(row["correct"] for row in graded), len(graded)


def pass_at_one(predictions: list[str], references: list[str]) -> float:
    """Fraction of generations whose final answer (:func:`extract_answer`) equals the reference's
    (one sample per problem, so Pass@1 is plain accuracy); 0.0 for no items."""
    correct, total = _pass_at_one_update(predictions, references)
    return correct / total if total else 0.0


class _FractionCorrect(Metric):
    """``correct / total`` (0 before any item), both summed across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total.clamp(min=1)


class PassAtOne(_FractionCorrect):
    """Pass@1 of generated final answers: ``update(predictions, references)`` with generated texts and
    reference answers (lists of strings); ``compute()`` is the fraction correct over every item seen
    by every process (0 before any item). States ``correct`` and ``total`` are summed across processes.
    """


    def update(self, predictions: list[str], references: list[str]) -> None:
        correct, total = _pass_at_one_update(list(predictions), list(references))
        self.correct += correct
        self.total += total



def _multiple_choice_update(scores: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, int]:
    if scores.ndim != 2 or answers.ndim != 1 or answers.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores (items, choices) and answers (items,); got scores {tuple(scores.shape)} "
                         f"and answers {tuple(answers.shape)}")
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise ValueError("scores must be finite or -inf (a missing choice); got NaN or +inf")
    if answers.numel() and (answers.min() < 0 or answers.max() >= scores.shape[1]):
        raise ValueError(f"answers must be choice positions in [0, {scores.shape[1]}); got {answers.tolist()}")
    answer_scores = scores.gather(1, answers[:, None].long().to(scores.device))[:, 0]
    if torch.isneginf(answer_scores).any():
        bad = torch.isneginf(answer_scores).nonzero()[:, 0].tolist()
        raise ValueError(f"the answer of item(s) {bad} points at a missing (-inf) choice")
    predicted = scores.argmax(1)  # torch.argmax returns the first maximum: ties go to the lowest index
    return (predicted == answers.to(scores.device)).sum(), answers.shape[0]


def multiple_choice_accuracy(scores: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Fraction of items whose highest-scoring choice is the answer.

    Args:
        scores: ``(items, choices)`` score of each choice (e.g. its log-likelihood); ``-inf`` where an
            item has fewer choices. Ties go to the lowest choice index.
        answers: ``(items,)`` position of each item's right choice.

    Returns:
        A float64 scalar (0 for no items).
    """
    correct, total = _multiple_choice_update(scores, answers)
    return correct.double() / max(total, 1)


class MultipleChoiceAccuracy(_FractionCorrect):
    """Accuracy of choosing the highest-scoring choice: ``update(scores (items, choices), answers (items,))``
    as in :func:`multiple_choice_accuracy` (``-inf`` for missing choices, ties to the lowest index).
    States ``correct`` and ``total`` are summed across processes."""


    def update(self, scores: torch.Tensor, answers: torch.Tensor) -> None:
        correct, total = _multiple_choice_update(scores, answers)
        self.correct += correct.to(self.correct.device)
        self.total += total

