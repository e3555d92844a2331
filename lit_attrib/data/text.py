"""TextDataModule: question-answer or plain-text data for fine-tuning and analysing a causal LM."""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Literal

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from lit_attrib.data.collate import CausalLMCollator
from lit_attrib.data.sources import load_source, require_columns, seeded_split
from lit_attrib.data.tokenizer import load_tokenizer
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = ["TextDataModule", "normalize_text"]


def normalize_text(text: str) -> str:
    """Unicode NFKC, every whitespace run collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


class TextDataModule(LightningDataModule):
    """Fine-tuning data from a hub id or a local file, tokenized for a causal LM.

    ``format: qa`` renders each row as ``prompt_template.format(input=row[input_column])`` followed by
    ``answer_template.format(output=row[output_column])`` and the end-of-sequence token; only the
    answer tokens (and that eos) carry loss, prompt and padding labels are -100. ``format: text``
    trains on every token of ``row[text_column]``. ``format: chat`` is ``qa`` for chat models: the prompt is
    the tokenizer's chat template around one user message ``prompt_template.format(input=...)``, with the
    assistant turn opened (``add_generation_prompt``), and the answer is the assistant's reply followed by
    the end-of-sequence token (``<|im_end|>`` for SmolLM2), exactly as the template writes a reply.

    Truncation policy (``max_length``): the prompt is never cut. In ``qa`` format the answer is cut
    from its end to fit, and a warning says how many rows were cut; a prompt that leaves no room for
    even one answer token is an error (no row is ever silently left without an answer). In ``text``
    format rows are cut from the end.

    Every row keeps ``index``, its position in the source split, through shuffling, splitting and
    batching: attribution results are reported in that order.

    Args:
        path: hub dataset id (``owner/name``) or a local ``.json``/``.jsonl``/``.csv``/``.parquet``
            file or ``save_to_disk`` folder.
        tokenizer: tokenizer hub id or local folder (e.g. ``data/facts/tokenizer``).
        format: ``qa`` (loss on the answer only), ``chat`` (``qa`` through the tokenizer's chat template) or
            ``text`` (loss on every token).
        input_column: prompt column for ``qa``.
        output_column: answer column for ``qa``.
        text_column: text column for ``text``.
        prompt_template: template of the prompt, with ``{input}`` (default: ``Question: {input}``, a new line, ``Answer:``;
            for ``chat`` the user message, default ``"{input}"``).
        answer_template: template of the answer, with ``{output}`` (default ``" {output}"``; for ``chat``
            ``"{output}"``).
        system_prompt: for ``chat``, a system message before the user's (default: none, so the template's own
            default applies; SmolLM2's is "You are a helpful AI assistant named SmolLM, ...").
        subset: hub configuration name, if the dataset has several.
        split: which split of the source to read.
        normalize: apply Unicode NFKC and collapse whitespace in every text field.
        max_length: longest tokenized row (see the truncation policy above).
        num_samples: use only the first ``num_samples`` rows of the source (all if ``None``).
        val_size: validation rows, as a count or a fraction in [0, 1); 0 for none.
        seed: seed of the train/validation split.
        batch_size: training batch size per device.
        eval_batch_size: validation and prediction batch size (default: ``batch_size``).
        num_workers: data-loader worker processes.
        predict_split: rows used by ``predict``: ``val``, ``train`` or ``all`` (``TofuDataModule`` adds
            ``forget`` and ``retain``).
        predict_content: what ``predict`` batches hold: ``prompts`` (left-padded, for generation) or
            ``examples`` (whole rows with labels, as in training: for analysis passes such as curvature
            or influence, where the callbacks do the work and nothing is generated).
        predict_path: a separate file or hub id of prompts for ``predict`` (uses ``input_column``;
            ``output_column``, when present, is kept as the reference answer).
        predict_num_samples: use only the first rows of the prediction set.
        query_split: rows of :meth:`query_dataloader` (the queries of ``InfluenceCallback``) when no
            ``query_path`` is given: ``val``, ``train``, ``all`` (``TofuDataModule``: also ``forget``,
            ``retain``).
        query_path: a file or hub id of queries instead: rows with ``input_column`` and
            ``output_column``, or a ``generated.jsonl`` from ``GenerationWriter`` (its ``prompt`` and
            ``generated`` answer: which training examples made the model answer this way?).
        query_num_samples: use only the first rows of the queries.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str,
        format: Literal["qa", "chat", "text"] = "qa",
        input_column: str = "question",
        output_column: str = "answer",
        text_column: str = "text",
        prompt_template: str | None = None,
        answer_template: str | None = None,
        system_prompt: str | None = None,
        subset: str | None = None,
        split: str = "train",
        normalize: bool = False,
        max_length: int = 512,
        num_samples: int | None = None,
        val_size: int | float = 0.1,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        predict_split: str = "val",
        predict_content: Literal["prompts", "examples"] = "prompts",
        predict_path: str | None = None,
        predict_num_samples: int | None = None,
        query_split: str = "val",
        query_path: str | None = None,
        query_num_samples: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if max_length < 2:
            problems.append(f"max_length must be at least 2 tokens; got {max_length}")
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1; got {batch_size}")
        if num_samples is not None and num_samples < 1:
            problems.append(f"num_samples must be at least 1 (or null for all rows); got {num_samples}")
        chat = format == "chat"
        prompt_template = prompt_template if prompt_template is not None else ("{input}" if chat else "Question: {input}\nAnswer:")
        answer_template = answer_template if answer_template is not None else ("{output}" if chat else " {output}")
        if format not in ("qa", "chat", "text"):
            problems.append(f"format must be one of ['qa', 'chat', 'text']; got {format!r}")
        if "{input}" not in prompt_template and format != "text":
            problems.append(f"prompt_template must contain '{{input}}'; got {prompt_template!r}")
        if "{output}" not in answer_template and format != "text":
            problems.append(f"answer_template must contain '{{output}}'; got {answer_template!r}")
        if problems:
            raise ConfigError("invalid TextDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.hparams.prompt_template, self.hparams.answer_template = prompt_template, answer_template  # resolved
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.predict_dataset: datasets.Dataset | None = None
        self.query_dataset: datasets.Dataset | None = None
        self._source: datasets.Dataset | None = None
        self._split_rows: dict[str, list[int]] = {}
        self._tokenized_splits: dict[tuple[str, int | None], datasets.Dataset] = {}  # each named split once

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name)

    # ----------------------------------------------------------------------------------- hooks
    def prepare_data(self) -> None:
        # Download (or read) once per node, so that hub errors surface before any process forks.
        load_source(self.hparams.path, subset=self.hparams.subset, split=self.hparams.split)

    def setup(self, stage: str) -> None:
        if self.train_dataset is None:
            self._source = self._read(self.hparams.path, self.hparams.num_samples, self._required_columns())
            train_rows, val_rows = seeded_split(len(self._source), self.hparams.val_size, self.hparams.seed)
            self._split_rows = {"train": train_rows, "val": val_rows, "all": list(range(len(self._source))),
                                **self._extra_splits(self._source)}
            self.train_dataset = self._tokenize(self._source.select(train_rows), with_answer=True)
            self.val_dataset = self._tokenize(self._source.select(val_rows), with_answer=True) if val_rows else None
            rank_zero_info(
                f"TextDataModule: {len(self.train_dataset)} training and {len(val_rows)} validation rows "
                f"from '{self.hparams.path}'"
            )
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = self._build_predict_dataset()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            return []  # Lightning skips validation on an empty list
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False, evaluation=True)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        side = "left" if self.hparams.predict_content == "prompts" else "right"
        return self._loader(self.predict_dataset, self.eval_batch_size, shuffle=False, padding_side=side)

    def query_dataloader(self) -> DataLoader:
        """Whole query examples (prompt + answer, loss on the answer) for ``InfluenceCallback``."""
        if self.query_dataset is None:
            self.query_dataset = self._build_query_dataset()
        return self._loader(self.query_dataset, self.eval_batch_size, shuffle=False)

    def split_dataloader(self, split: str) -> DataLoader:
        """Whole examples of one named split (``train``, ``val``, ``all``, and the subclass's own)."""
        return self._loader(self._examples(split, "split"), self.eval_batch_size, shuffle=False)

    # -------------------------------------------------------------------------------- helpers
    def _required_columns(self) -> list[str]:
        if self.hparams.format != "text":
            return [self.hparams.input_column, self.hparams.output_column]
        return [self.hparams.text_column]

    def _read(self, path: str, num_samples: int | None, columns: list[str]) -> datasets.Dataset:
        source = load_source(path, subset=self.hparams.subset, split=self.hparams.split)
        require_columns(source, columns, source=path)
        if len(source) == 0:
            raise DataError(f"dataset '{path}' (split '{self.hparams.split}') is empty")
        source = source.add_column("index", list(range(len(source))))
        if num_samples is not None:
            source = source.select(range(min(num_samples, len(source))))
        return source

    def _text(self, value) -> str:
        text = "" if value is None else str(value)
        return normalize_text(text) if self.hparams.normalize else text

    def _chat_prompt(self, message: str) -> str:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"format: chat needs a tokenizer with a chat template; '{self.tokenizer_name}' has none. "
                            f"Use format: qa with a prompt_template, or a chat model's tokenizer")
        system = self.hparams.get("system_prompt")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": message}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokenize(self, rows: datasets.Dataset, *, with_answer: bool, prompt_column: str | None = None,
                  answer_column: str | None = None) -> datasets.Dataset:
        """Tokenize rows; with ``with_answer=False`` keep prompts only (for generation).

        With ``prompt_column`` the prompt is that column as it stands (already templated, e.g. a
        ``generated.jsonl``), and the answer comes from ``answer_column``.
        """
        hp = self.hparams
        tokenizer = self.tokenizer
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def encode(row: dict) -> dict:
            if hp.format == "text":
                ids = (bos + self._encode(self._text(row[hp.text_column])) + eos)[: hp.max_length]
                return {"input_ids": ids, "labels": ids, "prompt_length": 0, "truncated": False}
            if prompt_column is not None:
                prompt = str(row[prompt_column])
            elif hp.format == "chat":
                prompt = self._chat_prompt(hp.prompt_template.format(input=self._text(row[hp.input_column])))
            else:
                prompt = hp.prompt_template.format(input=self._text(row[hp.input_column]))
            reference = self._text(row.get(answer_column or hp.output_column))
            prompt_ids = (bos if hp.format == "qa" else []) + self._encode(prompt)  # a chat template opens itself
            answer = hp.answer_template.format(output=reference)
            out = {"prompt": prompt, "reference": reference}
            if not with_answer:
                return {**out, "input_ids": prompt_ids, "prompt_length": len(prompt_ids), "truncated": False}
            answer_ids = self._encode(answer) + eos
            room = max(hp.max_length - len(prompt_ids), 0)
            ids = prompt_ids + answer_ids[:room]
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids[:room]
            return {**out, "input_ids": ids, "labels": labels, "prompt_length": len(prompt_ids),
                    "truncated": len(answer_ids) > room}

        # A fingerprint of our own: datasets would otherwise hash `encode` by pickling what it closes over, the
        # data module and, through its trainer, the model (40 s and 10 GB on SmolLM2-135M, every split).
        encoded = rows.map(encode, remove_columns=[c for c in rows.column_names if c != "index"],
                           keep_in_memory=True, desc="tokenizing", new_fingerprint=uuid.uuid4().hex)
        if hp.format != "text" and with_answer:
            self._check_lengths(encoded)
        return encoded

    def _check_lengths(self, encoded: datasets.Dataset) -> None:
        max_length = self.hparams.max_length
        prompt_lengths = encoded["prompt_length"]
        too_long = [i for i, n in enumerate(prompt_lengths) if n >= max_length]
        if too_long:
            first = too_long[0]
            raise DataError(
                f"max_length={max_length} is shorter than the prompt of {len(too_long)} row(s) (first: dataset "
                f"index {encoded[first]['index']}, prompt of {prompt_lengths[first]} tokens), leaving no room for "
                f"the answer. Raise max_length above the longest prompt ({max(prompt_lengths)} tokens) or "
                f"shorten prompt_template."
            )
        truncated = sum(encoded["truncated"])
        if truncated:
            rank_zero_warn(
                f"{truncated} of {len(encoded)} rows had their answer cut to fit max_length={max_length} "
                f"(the prompt is kept whole; raise max_length to keep full answers)"
            )

    def _extra_splits(self, source: datasets.Dataset) -> dict[str, list[int]]:
        """More named row sets (positions in the source) for subclasses, e.g. TOFU's forget/retain."""
        return {}

    def _examples(self, split: str, what: str, limit: int | None = None) -> datasets.Dataset:
        """The tokenized whole examples of a named split (the rows ``setup`` already read)."""
        if split not in self._split_rows:
            raise DataError(f"{what}='{split}' is not a split of {type(self).__name__}; choose one of "
                            f"{sorted(self._split_rows)}")
        rows = self._split_rows[split][slice(None, limit)]
        if not rows:
            raise DataError(f"{what}='{split}' is empty" + ("; set val_size > 0 or choose 'train'" if split == "val" else ""))
        if split in ("train", "val"):  # already tokenized, with their answers
            dataset = self.train_dataset if split == "train" else self.val_dataset
            return dataset.select(range(len(rows)))
        if (split, limit) not in self._tokenized_splits:  # datasets' map hashes the tokenizer on every call
            self._tokenized_splits[split, limit] = self._tokenize(self._source.select(rows), with_answer=True)
        return self._tokenized_splits[split, limit]

    def _build_predict_dataset(self) -> datasets.Dataset:
        hp = self.hparams
        examples = hp.predict_content == "examples"
        if hp.format == "text" and not examples:
            raise DataError("predict generates answers to prompts and needs format: qa or chat (or predict_content: "
                            "examples)")
        limit = slice(None, hp.predict_num_samples)
        if hp.predict_path is not None:
            source = load_source(hp.predict_path, subset=None, split="train")
            require_columns(source, self._required_columns() if examples else [hp.input_column], source=hp.predict_path)
            source = source.add_column("index", list(range(len(source))))
            return self._tokenize(source.select(range(len(source))[limit]), with_answer=examples)
        if examples:
            return self._examples(hp.predict_split, "predict_split", hp.predict_num_samples)
        if hp.predict_split not in self._split_rows:
            raise DataError(f"predict_split='{hp.predict_split}' is not a split of {type(self).__name__}; choose one "
                            f"of {sorted(self._split_rows)}")
        rows = self._split_rows[hp.predict_split][limit]
        if not rows:
            raise DataError(f"predict_split='{hp.predict_split}' is empty; set val_size > 0 or choose 'train'")
        return self._tokenize(self._source.select(rows), with_answer=False)

    def _build_query_dataset(self) -> datasets.Dataset:
        hp = self.hparams
        if hp.query_path is None:
            return self._examples(hp.query_split, "query_split", hp.query_num_samples)
        source = load_source(hp.query_path, subset=None, split="train")
        if len(source) == 0:
            raise DataError(f"query file '{hp.query_path}' has no rows")
        if "index" not in source.column_names:
            source = source.add_column("index", list(range(len(source))))
        source = source.select(range(len(source))[slice(None, hp.query_num_samples)])
        if {"prompt", "generated"} <= set(source.column_names):  # a GenerationWriter file: prompts are templated
            return self._tokenize(source, with_answer=True, prompt_column="prompt", answer_column="generated")
        require_columns(source, self._required_columns(), source=hp.query_path)
        return self._tokenize(source, with_answer=True)

    def _exact_evaluation(self, trainer) -> bool:
        """Shard validation/test rows without repeats (ranks may then run different numbers of batches)
        only in the passes Lightning drives for ``validate``/``test``, not inside ``fit``, not under
        sharded strategies (FSDP, DeepSpeed: every forward is a collective), and not for a callback
        that asked for the loader by name (it shards, or needs every row, itself)."""
        sharded = any(kind in type(trainer.strategy).__name__ for kind in ("FSDP", "DeepSpeed"))
        return trainer.state.fn in ("validate", "test") and not sharded and not getattr(self, "direct_loader", False)

    def _loader(self, dataset, batch_size: int, *, shuffle: bool, padding_side: str = "right",
                evaluation: bool = False) -> DataLoader:
        collate = CausalLMCollator(pad_token_id=self.tokenizer.pad_token_id, padding_side=padding_side)
        columns = [c for c in ("input_ids", "labels", "index", "prompt", "reference", "token_class")
                   if c in dataset.column_names]
        dataset = dataset.select_columns(columns)
        # A stateful loader: a checkpoint taken mid-epoch resumes at the next batch, in the same order.
        # Across processes the order must not depend on any process's random state either: a seeded
        # DistributedSampler (Lightning sets its epoch) instead of the random sampler Lightning would wrap.
        loader_class, sampler = (StatefulDataLoader, None) if shuffle else (DataLoader, None)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            if shuffle:
                sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                             shuffle=True, seed=self.hparams.seed)
                shuffle = False
            elif evaluation and self._exact_evaluation(trainer):
                # every row exactly once: Lightning's own sampler pads the last batch with repeats
                sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                       rank=trainer.global_rank, shuffle=False)
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )
