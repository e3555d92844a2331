"""GSM8K with injected noise: where does a model look when a math word problem carries distractions?

Three kinds of noise sentence can be inserted into each question (``NOISE_TYPES``): ``inf``
(irrelevant numbers and facts), ``rcs`` (redundant calculation steps on the problem's own numbers)
and ``sd`` (semantically related distraction about the problem's people and objects). Every
tokenized row carries a per-token class (``TOKEN_CLASSES``: other / math / noise) computed from the
recorded character spans, so a callback can measure how much attention goes to the key math
information and how much to the noise (seed 004: DiffLlama against Llama).

A small offline stand-in for ``openai/gsm8k`` (integer arithmetic word problems with answers in
GSM8K's format, plus a byte-level BPE tokenizer trained on them and on the noise sentences) is
generated deterministically with::

    python -m lit_attrib.data.gsm8k --out data/gsm8k_tiny
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Literal

import datasets
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lit_attrib.data.text import TextDataModule
from lit_attrib.errors import DataError
from lit_attrib.io import write_jsonl

__all__ = [
    "NOISE_TYPES", "TOKEN_CLASSES", "NoisyGSM8KDataModule", "classify_tokens", "generate_problems", "inject_noise",
    "math_spans", "noise_sentence", "write_gsm8k_tiny",
]

NOISE_TYPES = ("clean", "inf", "rcs", "sd")
"""``clean`` (no noise), ``inf`` (irrelevant numbers/facts), ``rcs`` (redundant calculation steps),
``sd`` (semantically related distraction)."""

TOKEN_CLASSES = ("other", "math", "noise")
"""Names of the per-token class ids 0, 1, 2 (padding is -1 in batches)."""

Span = tuple[int, int]

# ------------------------------------------------------------------------------------- generator
_PEOPLE = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Max", "he"),
           ("Lily", "she"), ("Ben", "he"), ("Emma", "she"), ("Noah", "he"), ("Nora", "she"), ("Omar", "he"),
           ("Ruby", "she"), ("Jack", "he"), ("Ella", "she"), ("Tom", "he")]
_OBJECTS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "stamps", "shells", "beads",
            "balloons", "oranges", "buttons", "crayons", "eggs", "flowers"]
_CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars")]
_FINAL_QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} end up with?",
                    "How many {obj} does {name} have at the end?"]


def _pronouns(subject: str) -> dict[str, str]:
    return {"she": {"pron": "she", "obj_pron": "her", "pos": "her"},
            "he": {"pron": "he", "obj_pron": "him", "pos": "his"}}[subject]


def _problem(rng: random.Random) -> dict:
    """One problem: sentences, reasoning lines and the structured calculations ``[a, op, b, result]``."""
    (name, subject), (other, _) = rng.sample(_PEOPLE, 2)
    p = {"name": name, "other": other, "obj": rng.choice(_OBJECTS), **_pronouns(subject)}
    sentences, lines, calculations = [], [], []

    def calc(a: int, op: str, b: int, result: int, line: str) -> None:
        calculations.append([a, op, b, result])
        lines.append(line.format(calc=f"{a} {op} {b} = {result}", **p))

    if rng.random() < 0.3:  # the setup itself is a multiplication
        (one, many), k, m = rng.choice(_CONTAINERS), rng.randint(2, 6), rng.randint(2, 9)
        value = k * m
        sentences.append(f"{name} has {k} {many} with {m} {p['obj']} in each {one}.")
        calc(k, "*", m, value, "{name} starts with {calc} {obj}.")
        steps = rng.randint(0, 2)
    else:
        value = rng.randint(5, 40)
        sentences.append(f"{name} has {value} {p['obj']}.")
        steps = rng.randint(1, 2)
    for _ in range(steps):
        ops = ["+"] + (["-"] if value >= 3 else []) + (["*"] if value <= 40 else [])
        ops += ["/"] if any(value % d == 0 for d in (2, 3, 4)) else []
        op = rng.choice(ops)
        then = rng.choice(["", "Then "])
        pron = p["pron"] if then else p["pron"].capitalize()
        if op == "+":
            k = rng.randint(2, 15)
            sentence = rng.choice(["{then}{pron} buys {k} more {obj}.",
                                   "{then}{other} gives {obj_pron} {k} more {obj}.",
                                   "{then}{pron} finds {k} more {obj}."])
            result = value + k
            calc(value, "+", k, result, "After that, {name} has {calc} {obj}.")
        elif op == "-":
            k = rng.randint(1, value - 1)
            sentence = rng.choice(["{then}{pron} gives {k} {obj} to {other}.", "{then}{pron} loses {k} {obj}.",
                                   "{then}{pron} sells {k} {obj}."])
            result = value - k
            calc(value, "-", k, result, "After that, {name} has {calc} {obj}.")
        elif op == "*" and rng.random() < 0.5:
            (one, many), k, m = rng.choice(_CONTAINERS), rng.randint(2, 5), rng.randint(2, 9)
            sentence = f"{{then}}{{pron}} buys {k} {many} with {m} {{obj}} in each {one}."
            calc(k, "*", m, k * m, "{name} buys {calc} {obj}.")
            result = value + k * m
            calc(value, "+", k * m, result, "After that, {name} has {calc} {obj}.")
        elif op == "*":
            k = rng.choice([2, 3])
            sentence = "{then}{pron} " + ("doubles" if k == 2 else "triples") + " {pos} {obj}."
            result = value * k
            calc(value, "*", k, result, "After that, {name} has {calc} {obj}.")
        else:
            k = rng.choice([d for d in (2, 3, 4) if value % d == 0])
            sentence = "{then}{pron} puts {pos} {obj} into {k} equal piles and keeps one pile."
            result = value // k
            calc(value, "/", k, result, "One pile has {calc} {obj}.")
        sentences.append(sentence.format(then=then, k=k, **{**p, "pron": pron}))
        value = result
    sentences.append(rng.choice(_FINAL_QUESTIONS).format(**p))
    return {"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {value}"]),
            "calculations": calculations, "result": value}


def generate_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct GSM8K-style arithmetic word problems (deterministic for a seed).

    Each question has 2–4 short sentences (a person, objects, quantities, one to three of
    + − × ÷ steps) and ends with the question asked; integer numbers stay small (below ~200).

    Args:
        n: number of problems.
        seed: random seed.

    Returns:
        Rows with ``question``, ``answer`` (reasoning lines such as ``After that, Mia has 12 + 7 = 19
        apples.`` and a final ``#### 19`` line, as in ``openai/gsm8k``), ``calculations`` (the
        structured steps ``[a, op, b, result]``, op in ``+ - * /``) and ``result`` (the final answer).
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = _problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


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


def _check_noise(noise: str) -> None:
    if noise not in NOISE_TYPES:
        raise DataError(f"unknown noise type {noise!r}; choose one of {list(NOISE_TYPES)}")


def _sentence(rng: random.Random, question: str, noise: str) -> str:
    names = list(dict.fromkeys(w for w in re.findall(r"\b[A-Z][a-z]+\b", question) if w not in _NOT_NAMES))
    asked, counted = _ASKED_OBJECT.search(question), _COUNTED_OBJECT.findall(question)
    outsiders = [person for person, _ in _PEOPLE if person not in names]
    name = names[0] if names else rng.choice(outsiders)
    other = names[1] if len(names) > 1 else rng.choice([person for person in outsiders if person != name])
    obj = asked.group(1) if asked else counted[0] if counted else rng.choice(_OBJECTS)
    numbers = [int(n) for n in re.findall(r"(?<![\d.,$])\d{1,4}(?![\d,.]?\d)", question)][:4]
    while len(numbers) < 2:
        numbers.append(rng.randint(2, 20))
    a, b = sorted(rng.sample(numbers, 2), reverse=True)
    template = rng.choice(_TEMPLATES[noise])
    return template.format(
        name=name, other=other, obj=obj, obj2=rng.choice([o for o in _OBJECTS if o != obj]),
        x=rng.randint(2, 60), y=rng.randint(2, 60), a=a, b=b, sum=a + b, product=a * b, difference=a - b,
        double=2 * a, ten_b=10 * b,
    )


def noise_sentence(question: str, noise: str, seed: int, key: int | str = 0) -> str | None:
    """The sentence :func:`inject_noise` inserts into ``question`` (``None`` for ``clean``).

    Templated with seeded random choices, reusing the question's names, objects and (``rcs``) numbers.
    """
    _check_noise(noise)
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
    _check_noise(noise)
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


def _shift(spans: list[Span], by: int) -> list[Span]:
    return [(start + by, end + by) for start, end in spans]


def _prefix_length(template: str, field: str) -> int:
    """Characters the formatted ``template`` puts before ``{field}`` (escaped braces counted once)."""
    return template.format(**{field: "\0"}).index("\0")


# ------------------------------------------------------------------------------------ datamodule
class NoisyGSM8KDataModule(TextDataModule):
    """GSM8K (or any question/answer data) with one kind of noise injected into every question.

    Noise (see :func:`inject_noise`) goes into the question column of every source row before
    tokenization, keyed by the row's source ``index`` (the same row gets the same noise whatever
    ``num_samples``, split or order). :attr:`rows` keeps each row's original and noisy question, the
    noise span and the math spans; :meth:`write_noisy` saves them.

    Every tokenized row (whole examples and prompt-only rows) has ``token_class``, one id per entry of
    ``input_ids``: 0 ``other``, 1 ``math``, 2 ``noise`` (:data:`TOKEN_CLASSES`, also
    ``self.token_classes``; batches pad it with -1). It comes from the fast tokenizer's offset mapping
    against the recorded spans (:func:`classify_tokens`): the noise span and the math spans of the
    question are shifted by the prompt template's prefix, math spans of the answer by the answer
    template's prefix; BOS/EOS are ``other``. Rows read from ``predict_path``/``query_path`` get no
    noise (math and other only).

    Args:
        tokenizer: tokenizer hub id or local folder (must be a fast tokenizer: offsets are needed),
            e.g. ``data/gsm8k_tiny/tokenizer``.
        path: ``openai/gsm8k`` (hub) or local data with ``question``/``answer`` columns, e.g.
            ``data/gsm8k_tiny/test.jsonl`` (a single file has only the ``train`` split: set ``split: train``).
        subset: hub configuration (``main`` for GSM8K; ignored for local files).
        split: split of the source (GSM8K has ``train`` and ``test``).
        noise: ``clean``, ``inf`` (irrelevant numbers/facts), ``rcs`` (redundant calculation steps) or
            ``sd`` (semantically related distraction).
        noise_seed: seed of the noise sentences and their positions.
        prompt_template: template of the prompt, with ``{input}``.
        answer_template: template of the answer, with ``{output}``.
        val_size: validation rows: a count, a fraction in [0, 1), or the float ``1.0`` for *every* row
            (evaluation only: ``train_dataloader`` then raises). The default ``1.0`` evaluates the whole
            ``test`` split; set e.g. ``split: train`` and ``val_size: 0.05`` to fine-tune.
        **kwargs: every other :class:`TextDataModule` argument (``format`` must stay ``qa``).

    Example::

        data = NoisyGSM8KDataModule(tokenizer="data/gsm8k_tiny/tokenizer", path="data/gsm8k_tiny/test.jsonl",
                                    split="train", noise="rcs")
        data.setup("validate")
        batch = next(iter(data.val_dataloader()))  # input_ids, labels, token_class (B, T), reference ...
    """

    def __init__(
        self,
        tokenizer: str,
        path: str = "openai/gsm8k",
        subset: str | None = "main",
        split: str = "test",
        noise: Literal["clean", "inf", "rcs", "sd"] = "clean",
        noise_seed: int = 0,
        prompt_template: str = "Question: {input}\nAnswer:",
        answer_template: str = " {output}",
        val_size: int | float = 1.0,
        **kwargs,
    ) -> None:
        _check_noise(noise)
        if kwargs.get("format", "qa") != "qa":
            raise DataError(f"NoisyGSM8KDataModule needs format: qa (noise goes into the question); "
                            f"got format: {kwargs['format']}")
        super().__init__(path=path, tokenizer=tokenizer, subset=subset, split=split,
                         prompt_template=prompt_template, answer_template=answer_template, val_size=val_size,
                         **kwargs)
        self.token_classes = TOKEN_CLASSES
        self._noisy_rows: list[dict] | None = None

    @property
    def evaluation_only(self) -> bool:
        """Whether ``val_size`` is the float ``1.0``: every row is a validation row, none trains."""
        val_size = self.hparams.val_size
        return isinstance(val_size, float) and val_size == 1.0

    @property
    def rows(self) -> list[dict]:
        """Per source row, in source order: ``index``, ``question`` (original), ``noisy_question``,
        ``noise_span`` (``(start, end)`` in ``noisy_question``, ``None`` for ``clean``) and
        ``math_spans`` (:func:`math_spans` of ``noisy_question``; numbers inside the noise included)."""
        if self._noisy_rows is None:
            raise DataError("NoisyGSM8KDataModule.rows is filled by setup(); call data.setup('fit') (or "
                            "'validate') first")
        return self._noisy_rows

    def write_noisy(self, path: str | Path) -> Path:
        """Write :attr:`rows` as JSON lines to ``path`` (atomically) and return the path."""
        write_jsonl(path, self.rows)
        return Path(path)

    # ----------------------------------------------------------------------------------- hooks
    @override
    def setup(self, stage: str) -> None:
        if not self.evaluation_only:
            super().setup(stage)
            return
        if self.val_dataset is None:
            self._source = self._read(self.hparams.path, self.hparams.num_samples, self._required_columns())
            every = list(range(len(self._source)))
            self._split_rows = {"train": [], "val": every, "all": every, **self._extra_splits(self._source)}
            self.val_dataset = self._tokenize(self._source, with_answer=True)
            rank_zero_info(f"NoisyGSM8KDataModule: all {len(every)} rows of '{self.hparams.path}' are validation "
                           f"rows (val_size: 1.0), noise '{self.hparams.noise}'")
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = self._build_predict_dataset()

    @override
    def train_dataloader(self) -> DataLoader:
        if self.evaluation_only:
            raise DataError("val_size: 1.0 makes every row a validation row, so there is nothing to train on; "
                            "set val_size below 1.0 (e.g. 0.05) to fit, or run validate/test/predict")
        return super().train_dataloader()

    # -------------------------------------------------------------------------------- helpers
    @override
    def _read(self, path: str, num_samples: int | None, columns: list[str]) -> datasets.Dataset:
        source = super()._read(path, num_samples, columns)
        hp = self.hparams
        noisy, starts, ends, records = [], [], [], []
        for index, raw in zip(source["index"], source[hp.input_column]):
            question = self._text(raw)
            text, span = inject_noise(question, hp.noise, hp.noise_seed, key=index)
            if self._text(text) != text:  # _tokenize normalizes again: the spans must survive it
                raise DataError(f"row {index}: normalizing the noisy question changes it, so the noise span would "
                                f"move; set normalize: false")
            noisy.append(text)
            starts.append(-1 if span is None else span[0])
            ends.append(-1 if span is None else span[1])
            records.append({"index": index, "question": question, "noisy_question": text, "noise_span": span,
                            "math_spans": math_spans(text)})
        self._noisy_rows = records
        source = source.remove_columns(hp.input_column).add_column(hp.input_column, noisy)
        return source.add_column("_noise_start", starts).add_column("_noise_end", ends)

    @override
    def _tokenize(self, rows: datasets.Dataset, *, with_answer: bool, prompt_column: str | None = None,
                  answer_column: str | None = None) -> datasets.Dataset:
        encoded = super()._tokenize(rows, with_answer=with_answer, prompt_column=prompt_column,
                                    answer_column=answer_column)
        hp = self.hparams
        tokenizer = self.tokenizer
        if not tokenizer.is_fast:
            raise DataError(f"tokenizer '{self.tokenizer_name}' is not a fast tokenizer; token classes need its "
                            f"offset mapping. Use a tokenizer with a tokenizer.json (use_fast)")
        questions = None if prompt_column is not None else [self._text(q) for q in rows[hp.input_column]]
        if "_noise_start" in rows.column_names:
            spans = [None if s < 0 else (s, e) for s, e in zip(rows["_noise_start"], rows["_noise_end"])]
        else:
            spans = [None] * len(rows)
        n_bos = int(tokenizer.bos_token_id is not None)
        prompt_prefix = _prefix_length(hp.prompt_template, "input")
        answer_prefix = _prefix_length(hp.answer_template, "output")

        def classify(row: dict, i: int) -> dict:
            prompt = row["prompt"]
            if questions is None:  # an already templated prompt: no recorded spans, math over all of it
                noise, math = None, math_spans(prompt)
            else:
                question = questions[i]
                if prompt[prompt_prefix:prompt_prefix + len(question)] != question:
                    raise DataError(f"row {row['index']}: the question is not at character {prompt_prefix} of the "
                                    f"prompt; prompt_template must put {{input}} after a fixed prefix")
                noise = None if spans[i] is None else _shift([spans[i]], prompt_prefix)[0]
                math = _shift(math_spans(question), prompt_prefix)
            classes = [0] * n_bos + self._classify(tokenizer, prompt, row["input_ids"][n_bos:], noise, math, row)
            if with_answer:
                answer = hp.answer_template.format(output=row["reference"])
                answer_ids = row["input_ids"][len(classes):]
                math = _shift(math_spans(row["reference"]), answer_prefix)
                classes += self._classify(tokenizer, answer, answer_ids, None, math, row)
            classes += [0] * (len(row["input_ids"]) - len(classes))  # EOS
            return {"token_class": classes[:len(row["input_ids"])]}

        return encoded.map(classify, with_indices=True, keep_in_memory=True, desc="token classes")

    @staticmethod
    def _classify(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], noise: Span | None,
                  math: list[Span], row: dict) -> list[int]:
        """Classes of the tokens of ``text``, checked against the ids the row holds (``ids`` may be cut)."""
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        own = encoding["input_ids"]
        if own[:len(ids)] != ids[:len(own)]:
            raise DataError(f"row {row['index']}: tokenizing {text[:40]!r} with offsets gives other tokens than the "
                            f"row holds, so token classes cannot be aligned")
        return classify_tokens(encoding["offset_mapping"], text=text, noise_span=noise, math=math)[:len(ids)]


# ------------------------------------------------------------------------------------ tiny files
def write_gsm8k_tiny(out: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                     vocab_size: int = 768) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` (columns ``question``, ``answer``, as ``openai/gsm8k``) and a
    byte-level BPE tokenizer (``tokenizer/``) into ``out``.

    Train and test questions are distinct. The tokenizer is trained on the templated rows and on their
    noisy questions of every noise type, so that noise text tokenizes as well as the problems do.

    Args:
        out: output folder.
        n_train: training problems.
        n_test: test problems.
        seed: generator seed.
        vocab_size: BPE vocabulary size.
    """
    from lit_attrib.data.tokenizer import train_bpe_tokenizer

    out = Path(out)
    problems = [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(n_train + n_test, seed)]
    train, test = problems[:n_train], problems[n_train:]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems]
    texts += [f"Question: {inject_noise(p['question'], noise, seed, key=i)[0]}\nAnswer:"
              for noise in NOISE_TYPES[1:] for i, p in enumerate(problems)]
    train_bpe_tokenizer(texts, vocab_size=vocab_size).save_pretrained(out / "tokenizer")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny offline GSM8K-style dataset and its tokenizer.")
    parser.add_argument("--out", default="data/gsm8k_tiny", help="output folder (default: data/gsm8k_tiny)")
    parser.add_argument("--n-train", type=int, default=2000, help="training problems (default: 2000)")
    parser.add_argument("--n-test", type=int, default=200, help="test problems (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--vocab-size", type=int, default=768, help="BPE vocabulary size (default: 768)")
    args = parser.parse_args()
    out = write_gsm8k_tiny(args.out, args.n_train, args.n_test, args.seed, args.vocab_size)
    print(f"wrote {out / 'train.jsonl'}, {out / 'test.jsonl'} and {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
