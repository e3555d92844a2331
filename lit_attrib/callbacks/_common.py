"""Pieces the analysis callbacks share: batch handling, the default losses and the own backward pass."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_attrib.errors import ArtifactError, DataError, ModelError
from lit_attrib.ops.loss import loss_mask
from lit_attrib.tracking import LayerTracker

LossFn = Callable[[LightningModule, Any], torch.Tensor]
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


def tensors_checksum(tensors) -> str:
    """A short hash of weights from each tensor's sum and absolute sum (cheap; enough to tell
    checkpoints or edited weights apart, so that partial results of other weights are not reused)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor.is_floating_point():
            digest.update(tensor.detach().double().sum().cpu().numpy().tobytes())
            digest.update(tensor.detach().double().abs().sum().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _clone(batch: Any) -> Any:
    """A copy of the batch's tensors that autograd may use (batches made under inference mode may not)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {key: _clone(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone(value) for value in batch)
    return batch


def _slice(batch: Any, size: int) -> Any:
    """The first ``size`` examples of a batch (tensors and lists are cut along their first axis)."""
    if isinstance(batch, (torch.Tensor, list)):
        return batch[:size]
    if isinstance(batch, dict):
        return {key: _slice(value, size) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice(value, size) for value in batch)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    tensors = [v for v in (batch.values() if isinstance(batch, dict) else batch) if isinstance(v, torch.Tensor)]
    return int(tensors[0].shape[0])


def default_loss(pl_module: LightningModule, batch: Any) -> torch.Tensor:
    """``pl_module.per_example_loss(batch)``: the summed loss of each example, ``(B,)``."""
    if not hasattr(pl_module, "per_example_loss"):
        raise ModelError(
            f"{type(pl_module).__name__} has no per_example_loss(batch); pass loss_fn=your_function taking "
            f"(pl_module, batch) and returning the summed loss of each example, shape (B,)"
        )
    return pl_module.per_example_loss(batch)


def default_token_loss(pl_module: LightningModule, batch: Any) -> torch.Tensor:
    """``pl_module.per_token_loss(batch)``: the loss of each token, ``(B, T)`` (0 where none is taken)."""
    if not hasattr(pl_module, "per_token_loss"):
        raise ModelError(
            f"{type(pl_module).__name__} has no per_token_loss(batch); pass token_loss_fn=your_function taking "
            f"(pl_module, batch) and returning the loss of each token, shape (B, T)"
        )
    return pl_module.per_token_loss(batch)


def check_loss_shape(losses: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(losses.shape) != expected:
        raise ModelError(f"{what} must return a tensor of shape {expected} for this batch; got {tuple(losses.shape)}")


def own_backward(trainer: Trainer, pl_module: LightningModule, tracker: LayerTracker, loss_fn: LossFn,
                 batch: Any) -> torch.Tensor:
    """Forward and backward of ``loss_fn``'s per-example losses, for ``tracker``'s hooks only.

    The parameters' ``.grad`` are left untouched (gradients are taken with respect to the tracked
    outputs), and it works inside Lightning's inference-mode loops. Returns the losses ``(B,)``.

    Raises:
        ModelError: ``loss_fn`` does not return one loss per example.
    """
    with torch.inference_mode(False), torch.enable_grad(), trainer.precision_plugin.forward_context():
        batch = _clone(batch)
        tracker.reset()
        tracker.force_grad = tracker.active = True
        try:
            losses = loss_fn(pl_module, batch)
            check_loss_shape(losses, (_batch_size(batch),), "loss_fn (the summed loss of each example)")
            if tracker.outputs:
                torch.autograd.grad(losses.sum(), tracker.outputs, allow_unused=True)
        finally:
            tracker.active = tracker.force_grad = False
            tracker.reset()
    return losses.detach()


def train_gradient_scale(trainer: Trainer, pl_module: LightningModule, batch: Any, reduction: str, owner: str) -> float:
    """Factor from the gradient of the training loss (as the training step reduced it: ``sum``,
    ``example_mean``, ``token_mean``, or ``auto`` for ``pl_module.loss_reduction``) to that of the summed
    per-example losses, for hooks that observe the real training backward."""
    if reduction == "auto":
        reduction = getattr(pl_module, "loss_reduction", None)
    if reduction == "token_mean":
        normaliser = float(loss_mask(batch["labels"]).sum().clamp(min=1))
    elif reduction == "example_mean":
        normaliser = float(_batch_size(batch))
    elif reduction == "sum":
        normaliser = 1.0
    else:
        raise ModelError(
            f"{owner} cannot tell how {type(pl_module).__name__}'s training step reduces its loss (got {reduction!r}); "
            f"set train_loss_reduction to 'sum', 'example_mean' or 'token_mean', or give the module a loss_reduction "
            f"attribute"
        )
    scale = normaliser * trainer.accumulate_grad_batches
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:  # float16 AMP multiplies the loss by its scale
        scale /= float(scaler.get_scale())
    return scale


def datamodule_loader(trainer: Trainer, name: str, purpose: str):
    """``trainer.datamodule.<name>_dataloader()``, or a :class:`DataError` that says what to add."""
    datamodule = trainer.datamodule
    method = getattr(datamodule, f"{name}_dataloader", None)
    if method is None:
        raise DataError(
            f"{purpose} come from the datamodule's {name}_dataloader(), which {type(datamodule).__name__} does not "
            f"have; add that method, or name another loader (e.g. 'query', 'forget', 'retain', 'predict')"
        )
    datamodule.direct_loader = True  # the whole set, unsharded: the callback shards it itself where it must
    try:
        return method()
    finally:
        datamodule.direct_loader = False


def iterate_batches(trainer: Trainer, pl_module: LightningModule, loader, shard: bool = False) -> Iterator[Any]:
    """The loader's batches on the module's device; with ``shard``, only every ``world_size``-th from this rank."""
    for position, batch in enumerate(loader):
        if shard and position % trainer.world_size != trainer.global_rank:
            continue
        yield trainer.strategy.batch_to_device(batch, pl_module.device)


def context_length(pl_module: LightningModule) -> int | None:
    """The model's longest input (``max_position_embeddings`` / ``n_positions``), if it says."""
    for owner in (getattr(pl_module, "model", None), pl_module):
        config = getattr(owner, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
    return None


def check_context(batch: Any, limit: int | None, what: str) -> None:
    """Raise a :class:`DataError` naming the first example longer than the model's context."""
    if limit is None or not isinstance(batch, dict) or "input_ids" not in batch:
        return
    mask = batch.get("attention_mask")
    lengths = mask.sum(-1) if mask is not None else torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])
    longest = int(lengths.max())
    if longest > limit:
        row = int(lengths.argmax())
        index = int(batch["index"][row]) if "index" in batch else row
        raise DataError(
            f"{what} with dataset index {index} has {longest} tokens, longer than the model's context of {limit}; "
            f"lower the datamodule's max_length to {limit} or shorten the text"
        )


def decode_texts(trainer: Trainer, pl_module: LightningModule, batch: Any) -> list[str]:
    """The text of each example of a batch (its non-padding tokens decoded), or empty strings."""
    tokenizer = getattr(trainer.datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
    size = _batch_size(batch)
    if tokenizer is None or not isinstance(batch, dict) or "input_ids" not in batch:
        return [""] * size
    ids = batch["input_ids"].tolist()
    mask = batch["attention_mask"].tolist() if "attention_mask" in batch else [[1] * len(row) for row in ids]
    return [tokenizer.decode([t for t, m in zip(row, keep) if m], skip_special_tokens=True) for row, keep in zip(ids, mask)]


def show_progress(trainer: Trainer) -> bool:
    """A callback's own progress bar shows on rank zero when the trainer shows its progress bar."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


def batch_indices(batch: Any, start: int) -> torch.Tensor:
    """The batch's dataset ``index`` column, or running positions from ``start`` when it has none."""
    if isinstance(batch, dict) and "index" in batch:
        return batch["index"].detach().cpu().long()
    return torch.arange(start, start + _batch_size(batch))
