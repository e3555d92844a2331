"""MultipleChoiceDataModule: MMLU-style questions whose choices are scored as continuations of one prompt.

Seed 002 evaluates by answer log-likelihood: every choice of an item is appended to the item's prompt
and the model's log-likelihood of the appended tokens is that choice's score; the best-scoring choice
is the model's answer (:class:`~lit_attrib.modules.EvalModule` with ``task: multiple_choice``).

Also the tiny shipped set ``data/mc_tiny/mc.jsonl``: 4-way questions about the invented people of
``data/facts`` (tokenizer: ``data/facts/tokenizer``). Regenerate it (deterministic for a seed) with::

    python -m lit_attrib.data.multiple_choice --out data/mc_tiny
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_attrib.data.sources import load_source, require_columns
from lit_attrib.data.tokenizer import load_tokenizer
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.io import read_jsonl, write_jsonl
from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = [
    "MultipleChoiceCollator", "MultipleChoiceDataModule", "generate_mc_items", "parse_answer", "render_choices",
    "write_mc_dataset",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COLUMNS = ("question", "choices", "answer")
"""The columns of every source, as MMLU names them (``subject`` is optional)."""
DEFAULT_ANSWER_TEMPLATES = {"letter": " {letter}", "text": " {choice}"}


def render_choices(choices: list[str]) -> str:
    """MMLU's lettered list: ``"A. first\\nB. second"``."""
    return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


def parse_answer(value: Any, num_choices: int) -> int | None:
    """The position of the right choice from an index (``2``, ``"2"``) or a letter (``"C"``, ``"c"``);
    ``None`` if it is neither or out of range."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS:
            position = LETTERS.index(text.upper())
        elif text.isdigit():
            position = int(text)
        else:
            return None
    elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        position = int(value)
    else:
        return None
    return position if 0 <= position < num_choices else None


def _row_problems(row: dict) -> list[str]:
    """What is wrong with one source row (empty if it is a usable item)."""
    problems = []
    if not isinstance(row.get("question"), str):
        problems.append(f"its question is {row.get('question')!r}; give the question text")
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        problems.append(f"its choices are {choices!r}; give a list of at least 2 choice texts")
        return problems
    if len(choices) > len(LETTERS):
        problems.append(f"it has {len(choices)} choices; at most {len(LETTERS)} are supported")
    for position, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            problems.append(f"choice {position} ({LETTERS[position % 26]}) is {choice!r}; give every choice a "
                            f"non-empty text")
    if parse_answer(row.get("answer"), len(choices)) is None:
        problems.append(f"its answer is {row.get('answer')!r}; give the right choice's position 0..{len(choices) - 1} "
                        f"or its letter A..{LETTERS[min(len(choices), 26) - 1]}")
    return problems


@dataclass
class MultipleChoiceCollator:
    """Collate items so that all choices of one item stay in one batch (``batch_size`` counts items).

    Each item gives one row per choice: its prompt, then the choice's continuation. Tensor fields:

    - ``input_ids``, ``attention_mask``, ``labels`` ``(rows, T)``, right-padded; labels are ``-100``
      except on the continuation tokens;
    - ``item (rows,)``: position of the row's item in the batch; ``choice (rows,)``: its choice position;
    - ``answer``, ``index``, ``num_choices`` ``(items,)``: right choice, dataset index and choice count.

    Plus ``subject`` (a list of strings, one per item) and ``normalize`` (the data module's option, a string).

    Args:
        pad_token_id: id of padded positions (masked, no label).
        normalize: ``none`` or ``tokens``, passed through for the scorer.
    """

    pad_token_id: int
    normalize: str = "none"

    def __call__(self, items: list[dict]) -> dict:
        rows = [(position, choice, item["prompt_ids"], continuation) for position, item in enumerate(items)
                for choice, continuation in enumerate(item["continuations"])]
        length = max(len(prompt) + len(continuation) for _, _, prompt, continuation in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for row, (_, _, prompt, continuation) in enumerate(rows):
            ids = torch.as_tensor(prompt + continuation)
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
            labels[row, len(prompt):len(ids)] = ids[len(prompt):]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "item": torch.as_tensor([row[0] for row in rows], dtype=torch.long),
            "choice": torch.as_tensor([row[1] for row in rows], dtype=torch.long),
            "answer": torch.as_tensor([item["answer"] for item in items], dtype=torch.long),
            "index": torch.as_tensor([item["index"] for item in items], dtype=torch.long),
            "num_choices": torch.as_tensor([len(item["continuations"]) for item in items], dtype=torch.long),
            "subject": [item["subject"] for item in items],
            "normalize": self.normalize,
        }


class MultipleChoiceDataModule(LightningDataModule):
    """Multiple-choice items ``{question, choices, answer}`` for ``validate``/``test`` by answer scoring.

    Sources: hub ``cais/mmlu`` (one configuration per entry of ``subsets``, concatenated in that order;
    MMLU's columns are ``question``, ``subject``, ``choices``, ``answer``) or a local ``.json``/``.jsonl``/
    ``.csv``/``.parquet`` file with the same columns, where ``answer`` may also be a letter (``"B"``) and
    ``subsets`` keeps the rows whose ``subject`` is listed. An item's ``index`` is its position in that
    concatenation; results are reported in that order.

    Each choice is scored as a continuation of the item's prompt: ``prompt_template`` (placeholders
    ``{question}``, ``{choices}`` (the lettered list ``A. ...\\nB. ...``) and ``{subject}``) followed by
    ``answer_template`` (``{letter}`` and ``{choice}``). ``score: letter`` (the default, MMLU's
    convention) scores ``" A"``, ``" B"``, ...; ``score: text`` scores each choice's own text. The
    continuation's tokens are those the tokenizer gives the prompt and continuation together, after the
    prompt's own tokens (as lm-evaluation-harness does; ``" A"`` after ``"Answer:"`` is one token, not a
    space and a letter), unless the two merge across the boundary, then the continuation alone.

    ``normalize`` compares choices by the sum of their tokens' log-likelihoods (``none``) or by its mean
    over the continuation's tokens (``tokens``): with ``score: text`` the sum favours short choices, the
    mean does not. Letter continuations are all one token, where the two agree.

    Under DDP every item is seen exactly once (no padding repeats): metrics summed over processes count
    every item once.

    Args:
        tokenizer: tokenizer hub id or local folder (the scored model's).
        path: hub dataset id or local file.
        subsets: hub configurations to read (e.g. ``[professional_law, business_ethics]``); for a local
            file, the ``subject`` values to keep (all rows if ``None``).
        split: which split of a hub dataset (MMLU: ``test``, ``validation``, ``dev``); local files have
            only ``train``.
        prompt_template: the prompt of an item.
        answer_template: the continuation of each choice; default by ``score``: ``" {letter}"`` or ``" {choice}"``.
        score: ``letter`` or ``text``: what is scored when ``answer_template`` is not given.
        normalize: ``none`` (sum log-likelihood) or ``tokens`` (mean per continuation token).
        max_length: longest row (prompt and continuation) in tokens; a longer one is an error (``None``: no limit).
        num_samples: use only the first ``num_samples`` items (all if ``None``).
        batch_size: items per batch (each item brings all of its choices).
        num_workers: data-loader worker processes.
    """

    def __init__(
        self,
        tokenizer: str,
        path: str = "cais/mmlu",
        subsets: list[str] | None = None,
        split: str = "test",
        prompt_template: str = "{question}\n{choices}\nAnswer:",
        answer_template: str | None = None,
        score: Literal["letter", "text"] = "letter",
        normalize: Literal["none", "tokens"] = "none",
        max_length: int | None = None,
        num_samples: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if score not in DEFAULT_ANSWER_TEMPLATES:
            problems.append(f"score must be one of {list(DEFAULT_ANSWER_TEMPLATES)}; got '{score}'")
        if normalize not in ("none", "tokens"):
            problems.append(f"normalize must be 'none' or 'tokens'; got '{normalize}'")
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1; got {batch_size}")
        if num_samples is not None and num_samples < 1:
            problems.append(f"num_samples must be at least 1 (or null for all items); got {num_samples}")
        if max_length is not None and max_length < 2:
            problems.append(f"max_length must be at least 2 tokens (or null for no limit); got {max_length}")
        if subsets is not None and (isinstance(subsets, str) or not subsets):
            problems.append(f"subsets must be a non-empty list of names (or null); got {subsets!r}")
        for name, template, fields in (("prompt_template", prompt_template, ("question", "choices", "subject")),
                                       ("answer_template", answer_template, ("letter", "choice"))):
            try:
                if template is not None:
                    template.format(**dict.fromkeys(fields, ""))
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{name} {template!r} may only use the placeholders {['{' + f + '}' for f in fields]}; "
                                f"it has {exc}")
        if problems:
            raise ConfigError("invalid MultipleChoiceDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.items: list[dict] | None = None

    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    # ----------------------------------------------------------------------------------- hooks
    def prepare_data(self) -> None:
        self._sources()  # download (or read) once per node, so that hub errors surface before any process forks

    def setup(self, stage: str) -> None:
        if self.items is None:
            self.items = self._items()
            rank_zero_info(f"MultipleChoiceDataModule: {len(self.items)} items from '{self.hparams.path}'")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.items)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.items)

    # ------------------------------------------------------------------------------ reading
    def _sources(self) -> list[tuple[str, Any]]:
        """``(name, dataset)`` of every source read: one per hub subset, or the local file."""
        hp = self.hparams
        local = Path(hp.path).expanduser().exists()
        if local or hp.subsets is None:
            source = load_source(hp.path, split="train" if local and Path(hp.path).is_file() else hp.split)
            return [(hp.path, source)]
        return [(f"{hp.path}:{subset}", load_source(hp.path, subset=subset, split=hp.split)) for subset in hp.subsets]

    def _items(self) -> list[dict]:
        hp = self.hparams
        local = Path(hp.path).expanduser().exists()
        rows, problems = [], []
        for name, source in self._sources():
            require_columns(source, COLUMNS, source=name)
            subjects = source["subject"] if "subject" in source.column_names else [""] * len(source)
            if local and hp.subsets is not None:
                if "subject" not in source.column_names:
                    raise DataError(f"subsets={hp.subsets} keeps the rows of those subjects, but '{name}' has no "
                                    f"'subject' column; drop subsets or add the column")
                found = set(subjects)
                missing = [subset for subset in hp.subsets if subset not in found]
                if missing:
                    raise DataError(f"'{name}' has no rows of subject(s) {missing}; its subjects are {sorted(found)}")
            for position, row in enumerate(source):
                if local and hp.subsets is not None and subjects[position] not in hp.subsets:
                    continue
                problems += [f"row {position} of '{name}': {problem}" for problem in _row_problems(row)]
                rows.append({**row, "subject": subjects[position] or ""})
        if problems:
            more = f"\n  - ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            shown = "\n  - ".join(problems[:8]) + more
            raise DataError(f"{len(problems)} problem(s) with the multiple-choice items of '{hp.path}':\n  - {shown}\n"
                            f"Fix or drop those rows.")
        if not rows:
            raise DataError(f"'{hp.path}' (split '{hp.split}', subsets {hp.subsets}) holds no items")
        rows = rows[:hp.num_samples]
        return [self._encode(index, row) for index, row in enumerate(rows)]

    def _encode(self, index: int, row: dict) -> dict:
        """One tokenized item: the prompt (BOS first, as TextDataModule trains) and each choice's continuation."""
        hp = self.hparams
        tokenizer = self.tokenizer
        choices = [str(choice) for choice in row["choices"]]
        subject = str(row["subject"]).replace("_", " ")
        prompt = hp.prompt_template.format(question=row["question"], choices=render_choices(choices), subject=subject)
        template = hp.answer_template or DEFAULT_ANSWER_TEMPLATES[hp.score]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        continuations = []
        for position, choice in enumerate(choices):
            continuation = template.format(letter=LETTERS[position], choice=choice)
            whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
            if whole[:len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
                ids = whole[len(prompt_ids):]
            else:  # prompt and continuation merge across the boundary: the continuation alone
                ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not ids:
                raise DataError(f"item {index}: choice {position} gives an empty continuation {continuation!r}; check "
                                f"answer_template")
            continuations.append(ids)
        length = len(bos) + len(prompt_ids) + max(map(len, continuations))
        if hp.max_length is not None and length > hp.max_length:
            raise DataError(f"item {index} needs {length} tokens (prompt and longest choice), more than "
                            f"max_length={hp.max_length}; raise max_length or drop the item")
        return {"index": index, "subject": str(row["subject"]), "prompt": prompt, "prompt_ids": bos + prompt_ids,
                "continuations": continuations, "answer": parse_answer(row["answer"], len(choices))}

    def _loader(self, items: list[dict]) -> DataLoader:
        # every item once across processes (Lightning's own sampler pads the last batch with repeats)
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(items, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        collate = MultipleChoiceCollator(pad_token_id=self.tokenizer.pad_token_id, normalize=self.hparams.normalize)
        return DataLoader(items, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler,
                          collate_fn=collate, num_workers=self.hparams.num_workers)


# ------------------------------------------------------------------------- the shipped tiny set
def _fact_value(row: dict) -> str:
    """The attribute value stated by a fictitious-facts answer sentence (``"... was born in Maxdonwick."``)."""
    from lit_attrib.data.facts import _TEMPLATES

    sentence = _TEMPLATES[row["attribute"]][1]
    pattern = re.escape(sentence).replace(re.escape("{name}"), re.escape(row["person"]))
    match = re.fullmatch(pattern.replace(re.escape("{value}"), "(.+)"), row["answer"])
    if match is None:
        raise DataError(f"the facts row {row['fact_id']!r} does not read like its template {sentence!r}: "
                        f"{row['answer']!r}; regenerate data/facts")
    return match[1]


def generate_mc_items(facts: list[dict], num_items: int = 40, num_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items about the invented people of the fictitious-facts rows.

    The first paraphrase of as many facts, taken in turn from each attribute (hometown, profession,
    birth year, pet); the choices are the true value and ``num_choices - 1`` other values of the same
    attribute, in a seeded order, with the true value at A, B, C, D in turn. Columns: ``question``,
    ``subject`` (the attribute), ``choices``, ``answer`` (position), ``fact_id``.
    """
    facts = [row for row in facts if row["paraphrase_id"] == 0]
    by_attribute: dict[str, list[dict]] = {}
    for row in facts:
        by_attribute.setdefault(row["attribute"], []).append(row)
    values = {attribute: sorted({_fact_value(row) for row in rows}) for attribute, rows in by_attribute.items()}
    short = [attribute for attribute, found in values.items() if len(found) < num_choices]
    if short:
        raise DataError(f"attribute(s) {short} have fewer than {num_choices} distinct values; lower num_choices")
    rng = random.Random(seed)
    queues = {attribute: rng.sample(rows, len(rows)) for attribute, rows in sorted(by_attribute.items())}
    items = []
    while len(items) < num_items and any(queues.values()):
        for attribute, queue in queues.items():
            if queue and len(items) < num_items:
                row = queue.pop()
                truth = _fact_value(row)
                choices = rng.sample([v for v in values[attribute] if v != truth], num_choices - 1)
                choices.insert(len(items) % num_choices, truth)  # right answers spread evenly over A, B, C, D
                items.append({"question": row["question"], "subject": attribute, "choices": choices,
                              "answer": choices.index(truth), "fact_id": row["fact_id"]})
    return items


def write_mc_dataset(out_dir: str | Path, facts: str | Path = "data/facts/facts.jsonl", num_items: int = 40,
                     seed: int = 0) -> Path:
    """Write ``mc.jsonl`` of :func:`generate_mc_items` into ``out_dir``."""
    out = Path(out_dir) / "mc.jsonl"
    write_jsonl(out, generate_mc_items(read_jsonl(facts), num_items=num_items, seed=seed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny multiple-choice set about the fictitious facts.")
    parser.add_argument("--out", default="data/mc_tiny", help="output folder (default: data/mc_tiny)")
    parser.add_argument("--facts", default="data/facts/facts.jsonl", help="fictitious-facts rows to draw from")
    parser.add_argument("--num-items", type=int, default=40, help="number of items (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    print(f"wrote {write_mc_dataset(args.out, args.facts, args.num_items, args.seed)}")


if __name__ == "__main__":
    main()
