"""Noise for GSM8K questions and the per-token classes that say where a question's math and noise are.

Three kinds of noise sentence can be inserted into each question (:data:`NOISE_TYPES`): ``inf``
(irrelevant numbers and facts), ``rcs`` (redundant calculation steps on the problem's own numbers)
and ``sd`` (semantically related distraction about the problem's people and objects).
:func:`inject_noise` inserts one at a seeded sentence boundary and returns its character span;
:func:`math_spans` finds the key math information (numbers, operators, quantity words); and
:func:`classify_tokens` turns a tokenizer's offsets and those spans into a class per token
(:data:`TOKEN_CLASSES`: other / math / noise), which is how seed 004 measures where attention goes.
Plain strings and lists only: :class:`~lit_attrib.data.NoisyGSM8KDataModule` applies them to data.
"""

from __future__ import annotations

import random
import re

from lit_attrib.data.gsm8k_problems import OBJECTS, PEOPLE
from lit_attrib.errors import DataError

__all__ = [
    "NOISE_TYPES", "TOKEN_CLASSES", "Span", "check_noise_type", "classify_tokens", "inject_noise", "math_spans",
    "noise_sentence", "sentence_boundaries",
]

NOISE_TYPES = ("clean", "inf", "rcs", "sd")
"""``clean`` (no noise), ``inf`` (irrelevant numbers/facts), ``rcs`` (redundant calculation steps),
``sd`` (semantically related distraction)."""

TOKEN_CLASSES = ("other", "math", "noise")
"""Names of the per-token class ids 0, 1, 2 (padding is -1 in batches)."""

Span = tuple[int, int]
"""A character span ``(start, end)``, end exclusive."""

# ----------------------------------------------------------------------------------------- noise
_INF = [
    "The shop opened {x} years ago and has {y} windows.", "The town library has {x} shelves on {y} floors.",
    "A bus stops at the corner every {x} minutes.", "{name}'s cousin is {x} years old.",
    "The park nearby has {x} benches and {y} lamps.", "The school has {x} classrooms and {y} teachers.",
    "It was {x} degrees outside that day.", "{name}'s house number is {x}.",
    "The street has {x} houses and {y} trees.", "There are {x} days left until the holiday.",
]
_RCS = [
    "Note that {a} + {b} = {sum}, although this is not needed.",
    "As a side note, {a} * {b} = {product}, but this does not change the answer.",
    "One could also work out {a} - {b} = {difference}, which is not used here.",
    "Adding {a} and {b} gives {sum}, but that is not part of the question.",
    "Doubling {a} gives {double}, although nobody asked for it.",
    "It is also true that {a} + {a} = {double}, which does not matter here.",
    "Multiplying {b} by 10 gives {ten_b}, but that plays no role.",
    "Subtracting {b} from {a} leaves {difference}, which is not needed.",
]
_SD = [
    "{other} also likes {obj} but did not get any today.", "{name} thinks that {obj} look nicer on sunny days.",
    "{other} once read a book about {obj}.", "{name} keeps the {obj} in a blue box.",
    "{other} asked {name} where the {obj} came from.", "{name}'s sister prefers {obj2} to {obj}.",
    "Everyone agreed that the {obj} looked very nice.", "{other} was not interested in {obj} at all.",
    "{name} has always wanted to collect {obj2} as well.", "The {obj} reminded {other} of a trip to the seaside.",
]
_TEMPLATES = {"inf": _INF, "rcs": _RCS, "sd": _SD}

# Capitalised words that start sentences rather than name people (for finding the problem's names).
_NOT_NAMES = set("""A An The Then Now So But And Or If In On At After Before During Each Every How What When Where Which
Who Why She He They It Its Her His Their We I You Our This That These Those There Here Also For Of To With By From
As One Two Three Four Five Six Seven Eight Nine Ten Mr Mrs Ms Dr Monday Tuesday Wednesday Thursday Friday Saturday
Sunday January February March April May June July August September October November December""".split())
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof)$")
_BOUNDARY = re.compile(r"(?<=[.!?])(?=\s+\S)")
# The problem's object: the one asked about ("How many apples ..."), else a plural after a number ("12 more apples").
_ASKED_OBJECT = re.compile(r"\b[Hh]ow many ([a-z]{3,})\b")
_COUNTED_OBJECT = re.compile(r"\b\d+\s+(?:more\s+|of\s+)?([a-z]{3,}s)\b")


def _rng(seed: int, key: int | str, noise: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: independent of PYTHONHASHSEED and of row order.
    return random.Random(f"{seed}:{key}:{noise}")


def check_noise_type(noise: str) -> None:
    """Raise :class:`~lit_attrib.errors.DataError` unless ``noise`` is one of :data:`NOISE_TYPES`."""
    if noise not in NOISE_TYPES:
        raise DataError(f"unknown noise type {noise!r}; choose one of {list(NOISE_TYPES)}")


def _sentence(rng: random.Random, question: str, noise: str) -> str:
    names = list(dict.fromkeys(w for w in re.findall(r"\b[A-Z][a-z]+\b", question) if w not in _NOT_NAMES))
    asked, counted = _ASKED_OBJECT.search(question), _COUNTED_OBJECT.findall(question)
    outsiders = [person for person, _ in PEOPLE if person not in names]
    name = names[0] if names else rng.choice(outsiders)
    other = names[1] if len(names) > 1 else rng.choice([person for person in outsiders if person != name])
    obj = asked.group(1) if asked else counted[0] if counted else rng.choice(OBJECTS)
    numbers = [int(n) for n in re.findall(r"(?<![\d.,$])\d{1,4}(?![\d,.]?\d)", question)][:4]
    while len(numbers) < 2:
        numbers.append(rng.randint(2, 20))
    a, b = sorted(rng.sample(numbers, 2), reverse=True)
    template = rng.choice(_TEMPLATES[noise])
    return template.format(
        name=name, other=other, obj=obj, obj2=rng.choice([o for o in OBJECTS if o != obj]),
        x=rng.randint(2, 60), y=rng.randint(2, 60), a=a, b=b, sum=a + b, product=a * b, difference=a - b,
        double=2 * a, ten_b=10 * b,
    )


def noise_sentence(question: str, noise: str, seed: int, key: int | str = 0) -> str | None:
    """The sentence :func:`inject_noise` inserts into ``question`` (``None`` for ``clean``).

    Templated with seeded random choices, reusing the question's names, objects and (``rcs``) numbers.
    """
    check_noise_type(noise)
    return None if noise == "clean" else _sentence(_rng(seed, key, noise), question, noise)


def sentence_boundaries(question: str) -> list[int]:
    """Positions right after a sentence-ending ``.``/``!``/``?`` that is followed by whitespace and more text.

    The end of the text is never a boundary, so a noise sentence inserted at a boundary always comes
    before the final sentence (the question asked). A ``.`` after an abbreviation such as ``Mr`` is not
    a boundary.
    """
    return [m.start() for m in _BOUNDARY.finditer(question)
            if not _ABBREVIATION.search(question, 0, m.start() - 1)]


def inject_noise(question: str, noise: str, seed: int, key: int | str = 0) -> tuple[str, Span | None]:
    """Insert one noise sentence into ``question`` at a seeded random sentence boundary.

    The inserted text is the sentence with **one separating space**, and the returned span covers
    exactly that inserted text, so ``noisy[:start] + noisy[end:] == question`` always holds:

    - at a boundary ``p`` (see :func:`sentence_boundaries`) the space goes first:
      ``noisy = question[:p] + " " + sentence + question[p:]``, ``span = (p, p + 1 + len(sentence))``;
    - a question **without a sentence boundary** (e.g. a single sentence) gets the noise at its start,
      with the space last: ``noisy = sentence + " " + question``, ``span = (0, len(sentence) + 1)``.

    Either way ``noisy[start:end].strip() == noise_sentence(question, noise, seed, key)``.

    Args:
        question: the question text.
        noise: one of :data:`NOISE_TYPES`; ``clean`` returns the question unchanged and ``None``.
        seed: noise seed.
        key: the row's key (its source ``index``): the choice depends on ``(seed, key, noise)`` only.

    Returns:
        ``(noisy_question, (start, end))``, or ``(question, None)`` for ``clean``.

    Raises:
        DataError: an unknown noise type, or an empty question.
    """
    check_noise_type(noise)
    if noise == "clean":
        return question, None
    if not question.strip():
        raise DataError(f"cannot insert {noise} noise into an empty question (row {key}); drop or fill that row")
    rng = _rng(seed, key, noise)
    sentence = _sentence(rng, question, noise)  # drawn first: noise_sentence() repeats exactly this draw
    boundaries = sentence_boundaries(question)
    if not boundaries:
        return f"{sentence} {question}", (0, len(sentence) + 1)
    p = rng.choice(boundaries)
    return f"{question[:p]} {sentence}{question[p:]}", (p, p + 1 + len(sentence))


# ------------------------------------------------------------------------------------ math spans
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                 "hundreds? thousands? millions? billions? dozens? pairs? couple thirds? quarters? half halves")
_OPERATOR_WORDS = ("plus minus times multiplied multiply multiplies divided divide divides twice thrice "
                   "double doubled doubles triple tripled triples each per more less fewer total sum "
                   "difference product average percent altogether")
_MATH = re.compile(
    r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|\$?\.\d+%?"  # 12, 1,200, 3.5, $4.20, 25%, .5
    r"|\b(?:" + "|".join((_NUMBER_WORDS + " " + _OPERATOR_WORDS).split()) + r")\b"
    r"|[+=*×÷−]|(?<=[\s\d])[-/](?=[\s\d$])",  # a hyphen or slash counts between numbers, not in "18-year-old"
    re.IGNORECASE,
)


def math_spans(text: str) -> list[Span]:
    """Character spans ``(start, end)`` of the key math information in ``text``, in order, disjoint.

    Matched (case-insensitive, whole words):

    - numbers: integers, decimals, thousands with commas, ``$`` amounts and percentages
      (``12``, ``1,200``, ``3.5``, ``$4.20``, ``25%``);
    - operators: ``+ = * × ÷ −`` anywhere, ``-`` and ``/`` between numbers or spaces (not in
      ``18-year-old`` or ``km/h``);
    - operator words: plus, minus, times, multiplied/multiply, divided/divide, twice, thrice,
      double(d), triple(d), each, per, more, less, fewer, total, sum, difference, product, average,
      percent, altogether;
    - quantity words: zero … twenty, thirty … ninety, hundred(s), thousand(s), million(s),
      billion(s), dozen(s), pair(s), couple, third(s), quarter(s), half, halves.
    """
    return [match.span() for match in _MATH.finditer(text)]


def classify_tokens(offsets: list[Span], *, text: str, noise_span: Span | None, math: list[Span]) -> list[int]:
    """Class id (index into :data:`TOKEN_CLASSES`) of each token from its character ``offsets`` in ``text``.

    A token is ``noise`` (2) if it overlaps a non-space character of ``noise_span``, else ``math`` (1)
    if it overlaps a ``math`` span, else ``other`` (0). Empty offsets (special tokens) are ``other``.
    The noise span's separating space is left out so that a byte-level token such as ``" She"`` that
    merely starts on it is not counted as noise.
    """
    core = None
    if noise_span is not None:
        start, end = noise_span
        inside = text[start:end]
        start += len(inside) - len(inside.lstrip())
        end -= len(inside) - len(inside.rstrip())
        core = (start, end)
    classes = []
    for begin, finish in offsets:
        if finish <= begin:
            classes.append(0)
        elif core is not None and begin < core[1] and core[0] < finish:
            classes.append(2)
        elif any(begin < b and a < finish for a, b in math):
            classes.append(1)
        else:
            classes.append(0)
    return classes
