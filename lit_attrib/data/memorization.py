"""MemorizationDataModule: prefix/suffix windows for memorization tests, and held-out text for perplexity.

A *window* is ``prefix_len + suffix_len`` consecutive tokens of a text (the tokenizer's BOS first
when the window starts the text and ``add_bos``). A model has memorized it when, given the prefix,
it continues with exactly the suffix. Window batches carry ``prefix_len``; their ``labels`` are the
suffix tokens (the prefix is ``-100``), so a window batch is also an ordinary scoring batch.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_attrib.data.collate import CausalLMCollator
from lit_attrib.data.sources import load_source, require_columns
from lit_attrib.data.tokenizer import load_tokenizer
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = ["MemorizationDataModule", "collate_windows", "text_windows"]


def text_windows(ids: list[int], prefix_len: int, suffix_len: int, stride: int) -> list[tuple[int, list[int]]]:
    """``(offset, tokens)`` of every window of ``prefix_len + suffix_len`` tokens, ``stride`` apart."""
    size = prefix_len + suffix_len
    return [(offset, ids[offset:offset + size]) for offset in range(0, len(ids) - size + 1, stride)]


def collate_windows(rows: list[dict]) -> dict:
    """Stack equal-length windows: ``input_ids``/``attention_mask``/``labels (B, P + S)``, ``index``,
    ``source_index``, ``offset`` ``(B,)`` and ``prefix_len`` (an int)."""
    input_ids = torch.as_tensor([row["input_ids"] for row in rows], dtype=torch.long)
    prefix_len = rows[0]["prefix_len"]
    labels = input_ids.clone()
    labels[:, :prefix_len] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "index": torch.as_tensor([row["index"] for row in rows], dtype=torch.long),
        "source_index": torch.as_tensor([row["source_index"] for row in rows], dtype=torch.long),
        "offset": torch.as_tensor([row["offset"] for row in rows], dtype=torch.long),
        "prefix_len": prefix_len,
    }


class MemorizationDataModule(LightningDataModule):
    """Sequences to test for memorization, held-out text for perplexity, and text to scan for memorized windows.

    - ``validate``/``test``: the loaders of ``memorized`` (one window per row: its first ``prefix_len +
      suffix_len`` tokens) and of ``heldout`` (whole rows, loss on every token), in that order; a
      module tells them apart by the ``prefix_len`` key of window batches.
    - ``predict``: every window of ``scan``, ``stride`` tokens apart (for memorized-set discovery).

    Each source is a hub dataset id or a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, or a
    mapping ``{path: ..., subset: ..., split: ...}`` for a hub dataset's configuration and split. A
    ``memorized.jsonl`` written by :class:`~lit_attrib.callbacks.MemorizedSetCallback` has
    ``input_ids`` and is used as it stands (no re-tokenization).

    Args:
        tokenizer: tokenizer hub id or local folder.
        memorized: the sequences to test (e.g. canaries, or a discovered ``memorized.jsonl``).
        heldout: text for perplexity and nDCG.
        scan: text scanned for memorized windows in ``predict``.
        prefix_len: tokens given to the model.
        suffix_len: tokens it must continue with.
        stride: distance between scanned windows (default ``prefix_len + suffix_len``: no overlap).
        text_column: the text column of every source.
        add_bos: start each text with the tokenizer's BOS token (as ``TextDataModule`` trains on it).
        max_length: longest held-out row in tokens (longer rows are cut from the end).
        num_samples: use only the first rows of each source (all if ``None``).
        split: which split of hub sources to read (unless a source's mapping names its own).
        batch_size: rows per batch.
        num_workers: data-loading worker processes.
    """

    def __init__(
        self,
        tokenizer: str,
        memorized: str | dict | None = None,
        heldout: str | dict | None = None,
        scan: str | dict | None = None,
        prefix_len: int = 64,
        suffix_len: int = 48,
        stride: int | None = None,
        text_column: str = "text",
        add_bos: bool = True,
        max_length: int = 512,
        num_samples: int | None = None,
        split: str = "train",
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if prefix_len < 1 or suffix_len < 1:
            problems.append(f"prefix_len and suffix_len must be at least 1; got {prefix_len} and {suffix_len}")
        if stride is not None and stride < 1:
            problems.append(f"stride must be at least 1; got {stride}")
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1; got {batch_size}")
        if memorized is None and heldout is None and scan is None:
            problems.append("give at least one of memorized, heldout and scan")
        if problems:
            raise ConfigError("invalid MemorizationDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.datasets: dict[str, list[dict]] = {}

    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    @property
    def window(self) -> int:
        return self.hparams.prefix_len + self.hparams.suffix_len

    def prepare_data(self) -> None:
        # download (or read) once per node, before any process forks; only what this stage reads (the
        # `memorized` file of a validate config may be what the predict pass is about to write)
        function = getattr(getattr(self.trainer, "state", None), "fn", None)
        names = ("scan",) if function == "predict" else ("memorized", "heldout")
        for name in names:
            if self.hparams[name] is not None:
                self._load(self.hparams[name])

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("validate", "test", "fit"):
            if hp.memorized is not None and "memorized" not in self.datasets:
                self.datasets["memorized"] = self._memorized_windows(hp.memorized)
            if hp.heldout is not None and "heldout" not in self.datasets:
                self.datasets["heldout"] = self._heldout_rows(hp.heldout)
        if stage == "predict" and "scan" not in self.datasets:
            if hp.scan is None:
                raise DataError("memorized-set discovery scans `data.scan`; set it to the text to scan")
            self.datasets["scan"] = self._scan_windows(hp.scan)
        rank_zero_info("MemorizationDataModule: " + ", ".join(f"{len(rows)} {name} rows"
                                                                for name, rows in self.datasets.items()))

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        if "memorized" in self.datasets:
            loaders.append(self._loader(self.datasets["memorized"], collate_windows))
        if "heldout" in self.datasets:
            collate = CausalLMCollator(pad_token_id=self.tokenizer.pad_token_id)
            loaders.append(self._loader(self.datasets["heldout"], collate))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["scan"], collate_windows)

    # ------------------------------------------------------------------------------ reading
    def _load(self, source: str | dict):
        if isinstance(source, str):
            return load_source(source, split=self.hparams.split)
        unknown = set(source) - {"path", "subset", "split"}
        if "path" not in source or unknown:
            raise DataError(f"a source mapping takes path, subset and split; got {dict(source)}")
        return load_source(source["path"], subset=source.get("subset"), split=source.get("split", self.hparams.split))

    def _texts(self, path: str | dict, what: str) -> tuple[list[int], list[list[int]]]:
        """``(source indices, token ids)`` of a source's rows (``input_ids`` when it has them)."""
        hp = self.hparams
        source = self._load(path)
        if hp.num_samples is not None:
            source = source.select(range(min(hp.num_samples, len(source))))
        if len(source) == 0:
            raise DataError(f"the {what} source '{path}' is empty")
        if "input_ids" in source.column_names:
            for key in ("prefix_len", "suffix_len"):  # a memorized.jsonl says which windows it holds
                found = set(source[key]) if key in source.column_names else set()
                if found - {hp[key]}:
                    raise DataError(f"'{path}' holds windows with {key} {sorted(found)}, but this run uses "
                                    f"{key}={hp[key]}; use the same window as the pass that wrote it")
            indices = source["source_index"] if "source_index" in source.column_names else list(range(len(source)))
            return list(indices), [list(ids) for ids in source["input_ids"]]
        require_columns(source, [hp.text_column], source=str(path))
        tokenizer = self.tokenizer
        bos = [tokenizer.bos_token_id] if hp.add_bos and tokenizer.bos_token_id is not None else []
        ids = [bos + tokenizer(str(text), add_special_tokens=False)["input_ids"] for text in source[hp.text_column]]
        return list(range(len(source))), ids

    def _memorized_windows(self, path: str) -> list[dict]:
        hp = self.hparams
        indices, ids = self._texts(path, "memorized")
        short = [(i, len(row)) for i, row in enumerate(ids) if len(row) < self.window]
        if short:
            row, length = short[0]
            raise DataError(
                f"prefix_len + suffix_len = {hp.prefix_len} + {hp.suffix_len} = {self.window} tokens is longer than "
                f"{len(short)} sequence(s) of '{path}' (first: row {row}, {length} tokens); lower prefix_len or "
                f"suffix_len to at most {min(n for _, n in short)} tokens in all, or drop the short rows"
            )
        return [self._window_row(position, indices[position], 0, row[:self.window])
                for position, row in enumerate(ids)]

    def _scan_windows(self, path: str) -> list[dict]:
        hp = self.hparams
        indices, ids = self._texts(path, "scan")
        rows = []
        for source_index, row in zip(indices, ids):
            for offset, tokens in text_windows(row, hp.prefix_len, hp.suffix_len, hp.stride or self.window):
                rows.append(self._window_row(len(rows), source_index, offset, tokens))
        if not rows:
            raise DataError(f"no text of '{path}' has prefix_len + suffix_len = {self.window} tokens (the longest has "
                            f"{max(map(len, ids))}); lower prefix_len or suffix_len")
        return rows

    def _window_row(self, index: int, source_index: int, offset: int, tokens: list[int]) -> dict:
        return {"index": index, "source_index": int(source_index), "offset": offset, "input_ids": tokens,
                "prefix_len": self.hparams.prefix_len}

    def _heldout_rows(self, path: str) -> list[dict]:
        hp = self.hparams
        _, ids = self._texts(path, "heldout")
        tokenizer = self.tokenizer
        bos = 1 if hp.add_bos and tokenizer.bos_token_id is not None else 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # blank rows (wikitext has many) would only add BOS -> EOS predictions: leave them out
        rows = [(row + eos)[:hp.max_length] for row in ids if len(row) > bos]
        if not rows:
            raise DataError(f"the heldout source '{path}' has no text (every row is blank)")
        return [{"index": i, "input_ids": row, "labels": row} for i, row in enumerate(rows)]

    def _loader(self, rows: list[dict], collate) -> DataLoader:
        # Shard without repeating rows across processes, so that metrics summed over processes count
        # every row once (Lightning's own sampler pads the last batch with repeats).
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(rows, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        return DataLoader(rows, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler,
                          collate_fn=collate, num_workers=self.hparams.num_workers)
