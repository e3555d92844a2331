"""Data in, directly: the sets an analysis reads (queries, forget/retain, the examples to score) as a
``DataLoader``, a dataset, a file, or a datamodule loader's name; example ids; and running a
``predict`` pass on a module that never wrote ``predict_step``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lit_attrib.engine.task import Task
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.quiet import PREDICT_RETURNED_NONE

__all__ = ["DataSource", "ExampleIds", "batch_tokens", "current_loader", "example_checksums", "ensure_predict_step",
           "fresh_loader", "is_ordered", "is_sharded", "loader_count", "loader_rows", "require_one_loader", "source_name",
           "iterate_batches", "release_predict_step",
           "resolve_loader"]

DataSource = Union[str, os.PathLike, DataLoader, Dataset]
"""A DataLoader; a dataset (map-style; rows collated by the default collate); a path to a json/jsonl/csv/
parquet file (tokenized like the run's ``TextDataModule``, or with the module's tokenizer); or the name
``x`` of the datamodule's ``x_dataloader()``."""

_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def resolve_loader(source: DataSource, trainer: Trainer, pl_module: LightningModule, purpose: str,
                   batch_size: int = 8) -> DataLoader:
    """The loader of ``source`` (see :data:`DataSource`); ``purpose`` names the set in messages.

    Raises:
        DataError: a name the datamodule has no loader for (or no datamodule), or a file that does not exist.
    """
    if isinstance(source, DataLoader):
        return source
    if isinstance(source, Dataset):
        return DataLoader(source, batch_size=batch_size, shuffle=False)
    if hasattr(source, "__getitem__") and hasattr(source, "column_names"):  # a Hugging Face datasets.Dataset
        return DataLoader(source.with_format("torch"), batch_size=batch_size, shuffle=False)
    text = os.fspath(source)
    if text.endswith(_FILE_SUFFIXES) or os.sep in text:
        return _file_loader(Path(text), trainer, pl_module, purpose)
    return _datamodule_loader(trainer, text, purpose)


def _datamodule_loader(trainer: Trainer, name: str, purpose: str) -> DataLoader:
    datamodule = trainer.datamodule
    method = getattr(datamodule, f"{name}_dataloader", None)
    if method is None and name == "predict" and trainer.world_size == 1:
        # trainer.predict(module, dataloaders=...): the predict pass's own loader (one process reads it all)
        loaders = trainer.predict_dataloaders
        loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders or [])
        if len(loaders) == 1:
            return loaders[0]
    if method is None:
        owner = "the run has no datamodule" if datamodule is None else f"{type(datamodule).__name__} has no {name}_dataloader()"
        raise DataError(
            f"{purpose} are named '{name}', i.e. the datamodule's {name}_dataloader(), but {owner}. Hand the callback "
            f"the data directly instead (a DataLoader, a dataset, or a json/jsonl file), or name a loader the "
            f"datamodule has (e.g. 'query', 'forget', 'retain', 'predict')"
        )
    datamodule.direct_loader = True  # the whole set, unsharded: the callback shards it itself where it must
    try:
        return method()
    finally:
        datamodule.direct_loader = False


def _file_loader(path: Path, trainer: Trainer, pl_module: LightningModule, purpose: str) -> DataLoader:
    """A file of examples, tokenized as the run's ``TextDataModule`` tokenizes (template, ``max_length``),
    or with the module's tokenizer and ``TextDataModule``'s defaults."""
    if not path.is_file():
        raise DataError(f"{purpose}: '{path}' is not a file (nor a loader name: names have no '/' or suffix)")
    from lit_attrib.data.text import TextDataModule  # the data layer knows how files become examples

    datamodule = trainer.datamodule
    if isinstance(datamodule, TextDataModule):
        arguments = {**datamodule.hparams, "query_path": str(path), "query_num_samples": None}
    else:
        tokenizer = getattr(pl_module, "tokenizer", None)
        name = getattr(tokenizer, "name_or_path", None) or getattr(getattr(pl_module, "hparams", {}), "get",
                                                                        lambda *_: None)("tokenizer")
        if not name:
            raise DataError(f"{purpose}: to read '{path}' lit_attrib needs a tokenizer, and neither the datamodule "
                            f"(a TextDataModule) nor the module (a `tokenizer` attribute) has one; hand the callback "
                            f"a DataLoader instead")
        arguments = {"path": str(path), "tokenizer": name, "query_path": str(path), "val_size": 0}
    reader = TextDataModule(**arguments)
    return reader.query_dataloader()


_WRAPPERS = ("BatchSampler", "_IndexBatchSamplerWrapper", "DistributedSamplerWrapper", "_DatasetSamplerWrapper")
"""Samplers that keep the order of the sampler they wrap (torch's and Lightning's); any other batch
sampler (bucketing by length, say) may reorder, so positions would not be dataset indices."""


def _samplers(loader: Any) -> Iterator[Any]:
    """The loader's sampler and those it wraps, outermost first (with a batch sampler, the loader's own
    sampler is a placeholder: the batch sampler decides)."""
    item = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    for _ in range(8):  # wrappers nest a few levels at most
        if item is None:
            return
        yield item
        inner = [getattr(item, key, None) for key in ("_batch_sampler", "batch_sampler", "sampler", "_sampler")]
        item = next((value for value in inner if value is not None and value is not item), None)


def is_ordered(loader: Any) -> bool:
    """Whether the loader yields its dataset in order (so that positions are dataset indices): its
    sampler is sequential (or an unshuffled ``DistributedSampler``), wrapped only in samplers known to
    keep the order; an iterable dataset's order is its own."""
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        return True
    for item in _samplers(loader):
        if isinstance(item, SequentialSampler):
            return True
        if isinstance(item, DistributedSampler):
            return not item.shuffle
        if type(item).__name__ not in _WRAPPERS:
            return False
    return False


def is_sharded(loader: Any) -> bool:
    """Whether each process reads only its share of the loader (a ``DistributedSampler`` inside)."""
    return any(isinstance(item, DistributedSampler) for item in _samplers(loader))


class ExampleIds:
    """Each row's dataset index: the task's ``example_ids``, or positions in loader order.

    Positions are only right when the loader is not shuffled and one process reads all of it; both
    are checked (:meth:`check`) before any work, never guessed.
    """

    def __init__(self, task: Task, owner: str) -> None:
        self.task = task
        self.owner = owner
        self._next = 0

    def check(self, loader: Any, batch: Any, trainer: Trainer, what: str, sharded: bool = False) -> None:
        """Refuse positions as ids where they would be wrong: a shuffled or reordering loader, or a loader
        each process reads only a share of (``sharded``) under several processes."""
        if self.task.example_ids(batch) is not None:
            return
        fix = ("add an 'index' entry to each row (dict batches), or give a Task with example_ids=f(batch) -> (B,)")
        if sharded and trainer.world_size > 1:
            raise ConfigError(f"{self.owner}: the batches of {what} carry no example ids, and with {trainer.world_size} "
                              f"processes their positions are not dataset indices; {fix}")
        if not is_ordered(loader):
            raise ConfigError(f"{self.owner}: the loader of {what} is shuffled and its batches carry no example ids, so "
                              f"scores could not be put on the right examples; use shuffle=False, or {fix}")

    def reset(self) -> None:
        self._next = 0

    def __call__(self, batch: Any) -> torch.Tensor:
        ids = self.task.example_ids(batch)
        size = self.task.batch_size(batch)
        if ids is None:
            ids = torch.arange(self._next, self._next + size)
        elif len(ids) != size:
            raise ConfigError(f"{self.owner}: example_ids gave {len(ids)} ids for a batch of {size} examples")
        self._next += size
        return ids


def iterate_batches(trainer: Trainer, pl_module: LightningModule, loader, shard: bool = False) -> Iterator[Any]:
    """The loader's batches on the module's device; with ``shard``, only every ``world_size``-th from this rank
    (unless a ``DistributedSampler`` already gives each process its share)."""
    shard = shard and not is_sharded(loader)
    for position, batch in enumerate(loader):
        if shard and position % trainer.world_size != trainer.global_rank:
            continue
        yield trainer.strategy.batch_to_device(batch, pl_module.device)


def current_loader(trainer: Trainer, dataloader_idx: int = 0) -> Any:
    """The loader the running validate/test/predict loop reads (``dataloader_idx`` of several)."""
    fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
    loaders = {"validate": trainer.val_dataloaders, "fit": trainer.val_dataloaders, "test": trainer.test_dataloaders,
               "predict": trainer.predict_dataloaders}.get(fn)
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    if isinstance(loaders, dict):
        return list(loaders.values())[dataloader_idx]
    return loaders


def source_name(source: DataSource) -> str:
    """How a data source is recorded in arguments and messages: its loader name or path, else its type."""
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def require_one_loader(trainer: Trainer, owner: str) -> None:
    """Refuse a pass over several loaders: their rows would share example ids (one pass per set)."""
    if (count := loader_count(trainer)) > 1:
        raise ConfigError(f"{owner} reads one loader per pass, but this pass has {count}: their rows would share "
                          f"example ids; run one pass per set of examples")


def loader_count(trainer: Trainer) -> int:
    """How many loaders the running validate/test/predict loop reads."""
    fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
    loaders = {"validate": trainer.val_dataloaders, "fit": trainer.val_dataloaders, "test": trainer.test_dataloaders,
               "predict": trainer.predict_dataloaders}.get(fn)
    return len(loaders) if isinstance(loaders, (list, tuple, dict)) else int(loaders is not None)


def _no_predictions(batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> None:
    """The predict_step lit_attrib lends a module that has none: the analysis callbacks do the work."""
    return None


def ensure_predict_step(pl_module: LightningModule, owner: object, force: bool = False) -> None:
    """Lend ``pl_module`` a ``predict_step`` that returns nothing, if its class never defined one
    (Lightning's default calls ``forward(batch)``, which a module with another signature cannot take), or
    over its own with ``force`` (a pass where the callbacks do all the work, e.g. ``lit-attrib index-query``).
    ``owner`` (the callback) gives it back with :func:`release_predict_step`; lending twice is harmless."""
    if force or type(pl_module).predict_step is LightningModule.predict_step:
        # Lightning would warn on every pass that this predict_step returns None: it does so on purpose.
        warnings.filterwarnings("ignore", message=PREDICT_RETURNED_NONE)
        owners = pl_module.__dict__.setdefault("_lit_attrib_predict_owners", set())
        owners.add(id(owner))
        pl_module.__dict__["predict_step"] = _no_predictions


def release_predict_step(pl_module: LightningModule, owner: object) -> None:
    """Undo :func:`ensure_predict_step` for ``owner``; the module's own state returns once every owner has
    (after the pass, and after an exception: Lightning calls no ``teardown`` then)."""
    owners = pl_module.__dict__.get("_lit_attrib_predict_owners")
    if not owners:
        return
    owners.discard(id(owner))
    if not owners:
        del pl_module.__dict__["_lit_attrib_predict_owners"]
        if pl_module.__dict__.get("predict_step") is _no_predictions:
            del pl_module.__dict__["predict_step"]


def example_checksums(task: Task, batch: Any) -> torch.Tensor:
    """A hash (BLAKE2b, 63 bits) of each example's content, ``(B,)``, so that cached per-example results
    are recognised whatever batch they came in. Every tensor of the batch with one row per example
    counts; where the task knows a padding mask, only the real tokens of the ``(B, T)`` tensors count
    (so right padding does not change the hash)."""
    size = task.batch_size(batch)
    padding = task.padding_mask(batch)
    padding = None if padding is None else padding.detach().cpu().bool()
    items = sorted(batch.items()) if isinstance(batch, Mapping) else \
        list(enumerate(batch)) if isinstance(batch, (list, tuple)) else [(0, batch)]
    columns = [(str(key), value.detach().cpu()) for key, value in items
               if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == size]
    hashes = []
    for row in range(size):
        digest = hashlib.blake2b(digest_size=8)
        for key, value in columns:
            part = value[row]
            if padding is not None and part.shape == padding[row].shape:
                part = part[padding[row]]
            digest.update(key.encode())
            digest.update(str(part.dtype).encode())
            digest.update(part.contiguous().numpy().tobytes())
        hashes.append(int.from_bytes(digest.digest(), "little") >> 1)
    return torch.tensor(hashes, dtype=torch.long)


def loader_rows(loader: Any, task: Task) -> tuple[int, int, Any]:
    """``(rows, batch size, first batch or None)`` of a loader, from its lengths where it has them (rows
    is then an upper bound: whole batches), else by reading it through (collation only, no forward)."""
    batch = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    try:
        rows = len(loader) * batch if batch else None
        dataset = getattr(loader, "dataset", None)
        if rows is not None and dataset is not None and not isinstance(dataset, IterableDataset):
            rows = min(rows, len(dataset))
    except TypeError:
        rows = None
    if rows is not None:
        return rows, batch, None
    rows = batch = 0
    first = None
    for item in loader:
        size = task.batch_size(item)
        rows, batch, first = rows + size, max(batch, size), item if first is None else first
    return rows, max(batch, 1), first


def fresh_loader(loader: Any) -> Any:
    """A loader over the same rows, batches and order as ``loader`` whose reading leaves ``loader``'s own
    iterator alone. Lightning wraps the predict loader's batch sampler in one object whose ``__iter__``
    resets a single shared iterator, so reading the loader again inside the running pass would end (or
    restart) the predict loop's own reading; here the wrapped batch sampler is read instead."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    batch_sampler = loader.batch_sampler
    while type(batch_sampler).__name__ == "_IndexBatchSamplerWrapper":
        batch_sampler = batch_sampler._batch_sampler
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                      **extra)


def batch_tokens(task: Task, batch: Any) -> int:
    """A batch's sequence length (1 where it cannot be told: the estimate then leaves tokens out)."""
    ids = None if batch is None else task.input_ids(batch)
    return int(ids.shape[-1]) if ids is not None and ids.ndim == 2 else 1
