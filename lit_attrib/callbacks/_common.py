"""Pieces the analysis callbacks share: the artifact folder, checksums, context checks, texts, progress."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_attrib.engine.data import ensure_predict_step, release_predict_step
from lit_attrib.engine.task import Task
from lit_attrib.errors import ArtifactError, DataError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ArtifactCallback(Callback, ABC):
    """A callback that writes one named artifact folder (``output_dir``, default
    ``<trainer.log_dir>/<name>``) described by ``metadata_file``, which records its ``arguments()``."""

    metadata_file = "metadata.json"
    name: str
    output_dir: str | None
    overwrite: bool

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":  # the analysis is the callback's: a module without predict_step is lent one
            ensure_predict_step(pl_module, self)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        release_predict_step(pl_module, self)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        release_predict_step(pl_module, self)

    @abstractmethod
    def arguments(self) -> dict:
        """What the results depend on, as JSON (recorded in the metadata file)."""

    def folder(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / self.name

    def check_overwrite(self, trainer: Trainer) -> None:
        """Refuse to replace results that were made with other arguments, unless ``overwrite``."""
        path = self.folder(trainer) / self.metadata_file
        if path.is_file() and not self.overwrite:
            saved = json.loads(path.read_text()).get("arguments")
            if saved != json.loads(json.dumps(self.arguments())):
                raise ArtifactError(f"'{path.parent}' already holds {self.name} results made with other arguments; "
                                    f"choose another output_dir or name, or set overwrite=True to replace them")


def layers_checksum(layers) -> str:
    """:func:`tensors_checksum` of the weights of tracked layers (``{name: LayerInfo}``)."""
    return tensors_checksum(p for layer in layers.values() for p in layer.module.parameters())


def tensors_checksum(tensors) -> str:
    """A short hash of weights from each tensor's sum and absolute sum (cheap; enough to tell
    checkpoints or edited weights apart, so that partial results of other weights are not reused)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor.is_floating_point():
            digest.update(tensor.detach().double().sum().cpu().numpy().tobytes())
            digest.update(tensor.detach().double().abs().sum().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def context_length(pl_module: LightningModule) -> int | None:
    """The model's longest input (``max_position_embeddings`` / ``n_positions``), if it says."""
    for owner in (getattr(pl_module, "model", None), pl_module):
        config = getattr(owner, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
    return None


def check_context(task: Task, batch: Any, limit: int | None, what: str) -> None:
    """Raise a :class:`DataError` naming the first example longer than the model's context."""
    ids = task.input_ids(batch)
    if limit is None or ids is None or ids.ndim != 2:
        return
    mask = task.padding_mask(batch)
    lengths = mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
    longest = int(lengths.max())
    if longest > limit:
        row = int(lengths.argmax())
        known = task.example_ids(batch)
        index = int(known[row]) if known is not None else row
        raise DataError(
            f"{what} with dataset index {index} has {longest} tokens, longer than the model's context of {limit}; "
            f"lower the datamodule's max_length to {limit} or shorten the text"
        )


def decode_texts(trainer: Trainer, pl_module: LightningModule, task: Task, batch: Any) -> list[str]:
    """The text of each example of a batch (its non-padding tokens decoded), or empty strings."""
    tokenizer = getattr(trainer.datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
    ids = task.input_ids(batch)
    if tokenizer is None or ids is None:
        return [""] * task.batch_size(batch)
    mask = task.padding_mask(batch)
    mask = mask.tolist() if mask is not None else [[True] * ids.shape[1]] * ids.shape[0]
    return [tokenizer.decode([t for t, m in zip(row, keep) if m], skip_special_tokens=True)
            for row, keep in zip(ids.tolist(), mask)]


def show_progress(trainer: Trainer) -> bool:
    """A callback's own progress bar shows on rank zero when the trainer shows its progress bar."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None
