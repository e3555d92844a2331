"""GSM8K with injected noise: where does a model look when a math word problem carries distractions?

:class:`NoisyGSM8KDataModule` inserts one kind of noise sentence into every question (``inf``,
``rcs`` or ``sd``; :mod:`lit_attrib.data.gsm8k_noise`) and gives every tokenized row a per-token
class (other / math / noise) computed from the recorded character spans, so a callback can measure
how much attention goes to the key math information and how much to the noise (seed 004: DiffLlama
against Llama).

A small offline stand-in for ``openai/gsm8k`` (:mod:`lit_attrib.data.gsm8k_problems`, plus a
byte-level BPE tokenizer trained on the problems and on their noise sentences) is generated
deterministically with::

    python -m lit_attrib.data.gsm8k --out data/gsm8k_tiny

The generator's and the noise's public names are re-exported here (``from lit_attrib.data.gsm8k
import inject_noise`` keeps working).
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Literal

import datasets
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lit_attrib.data.gsm8k_noise import (
    NOISE_TYPES,
    TOKEN_CLASSES,
    Span,
    check_noise_type,
    classify_tokens,
    inject_noise,
    math_spans,
    noise_sentence,
    sentence_boundaries,
)
from lit_attrib.data.gsm8k_problems import generate_problems
from lit_attrib.data.text import TextDataModule
from lit_attrib.errors import DataError
from lit_attrib.io import write_jsonl

__all__ = [
    "NOISE_TYPES", "TOKEN_CLASSES", "NoisyGSM8KDataModule", "classify_tokens", "generate_problems", "inject_noise",
    "math_spans", "noise_sentence", "sentence_boundaries", "write_gsm8k_tiny",
]


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
        check_noise_type(noise)
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

        return encoded.map(classify, with_indices=True, keep_in_memory=True, desc="token classes",
                           new_fingerprint=uuid.uuid4().hex)  # not a hash of what `classify` closes over

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


def _shift(spans: list[Span], by: int) -> list[Span]:
    return [(start + by, end + by) for start, end in spans]


def _prefix_length(template: str, field: str) -> int:
    """Characters the formatted ``template`` puts before ``{field}`` (escaped braces counted once)."""
    return template.format(**{field: "\0"}).index("\0")


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
