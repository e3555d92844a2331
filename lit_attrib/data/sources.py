"""Tabular text sources: a hub dataset id or a local json/jsonl/csv/parquet file or folder."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import datasets

from lit_attrib.errors import DataError
from lit_attrib.hub import load_from_hub_or_path

__all__ = ["load_source", "require_columns", "seeded_split"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_source(path: str, *, subset: str | None = None, split: str = "train") -> datasets.Dataset:
    """Load one split of a dataset from a local file/folder or the Hugging Face hub.

    Args:
        path: a ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder written by
            ``Dataset.save_to_disk`` or holding such files, or a hub id such as ``locuslab/TOFU``.
        subset: the hub dataset's configuration name (e.g. ``forget10``), if it has several.
        split: which split to read; local single files have only ``train``.

    Raises:
        DataError: the file type is unsupported, the path is missing, the hub is unreachable, or the
            split does not exist.
    """

    def load(resolved: str) -> datasets.Dataset:
        local = Path(resolved)
        if local.is_file():
            builder = _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"cannot read '{resolved}': supported file types are {sorted(_BUILDERS)}")
            try:
                dataset = datasets.load_dataset(builder, data_files={"train": resolved}, split="train")
            except ValueError as exc:
                if "no data" in str(exc):  # datasets' words for a file without rows
                    raise DataError(f"dataset '{resolved}' is empty: it has no rows") from None
                raise
            if split != "train":
                raise DataError(f"'{resolved}' is a single file with only the 'train' split; got split='{split}'")
            return dataset
        if local.is_dir() and (local / "dataset_info.json").exists():
            return datasets.load_from_disk(resolved)
        try:
            return datasets.load_dataset(resolved, subset, split=split)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise DataError(f"dataset '{resolved}' has no split '{split}': {exc}") from None
            raise

    dataset = load_from_hub_or_path(path, load, what="dataset", error=DataError)
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"'{path}' holds several splits {list(dataset)}; choose one with `split`")
    return dataset


def require_columns(dataset: datasets.Dataset, columns: Iterable[str], *, source: str) -> None:
    """Raise a :class:`DataError` naming every missing column and every column that exists."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"dataset '{source}' has no column(s) {missing}; its columns are {dataset.column_names}. "
            f"Set input_column/output_column (format: qa) or text_column (format: text) to one of them."
        )


def seeded_split(num_rows: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Split row positions ``0..num_rows-1`` into (train, validation) with a seeded permutation.

    Args:
        num_rows: rows available.
        val_size: a count (int ≥ 0) or a fraction in [0, 1) of the rows for validation.
        seed: permutation seed; the same seed always gives the same split.

    Raises:
        DataError: the sizes leave the training or (requested) validation split empty.
    """
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise DataError(f"val_size as a fraction must be in [0, 1); got {val_size}")
    num_val = round(val_size * num_rows) if isinstance(val_size, float) else int(val_size)
    if val_size and num_val == 0:
        raise DataError(f"val_size={val_size} of {num_rows} rows gives an empty validation split; raise it")
    if num_val >= num_rows:
        raise DataError(f"val_size={val_size} leaves no training rows out of {num_rows}; lower it")
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[num_val:]), sorted(order[:num_val])
