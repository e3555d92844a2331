"""The gradient pass: an analysis's own forward/backward through the task's loss, and, in ``fit``, the
factor from the real training loss's gradient to that of each example's summed loss.

Both hand every use of every tracked layer to the :class:`~lit_attrib.engine.tracking.LayerTracker`'s
callbacks; what the analysis does with ``a`` and ``g`` lives in ``ops``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_attrib.engine.task import Task
from lit_attrib.engine.tracking import LayerTracker, exclusive
from lit_attrib.errors import ConfigError, LitAttribError, ModelError, TrainingError

__all__ = ["TrainLossScale", "check_loss_shape", "clone_batch", "own_backward", "slice_batch"]

Reduction = Literal["auto", "sum", "example_mean", "token_mean"]
REDUCTIONS = ("sum", "example_mean", "token_mean")


def clone_batch(batch: Any) -> Any:
    """A copy of the batch's tensors that autograd may use (batches made under inference mode may not)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, Mapping):
        return {key: clone_batch(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(clone_batch(value) for value in batch)
    return batch


def slice_batch(batch: Any, size: int) -> Any:
    """The first ``size`` examples of a batch (tensors and lists are cut along their first axis)."""
    if isinstance(batch, torch.Tensor):
        return batch[:size]
    if isinstance(batch, list) and any(isinstance(value, torch.Tensor) for value in batch):
        return [slice_batch(value, size) for value in batch]  # default collate of (x, y) samples: fields
    if isinstance(batch, list):
        return batch[:size]  # a list of per-example values (texts)
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, size) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(value, size) for value in batch)
    return batch


def check_loss_shape(losses: Any, expected: tuple[int, ...], what: str) -> None:
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ModelError(f"{what} must return a tensor of shape {expected} for this batch; got {got}")


def own_backward(trainer: Trainer | None, pl_module: LightningModule, tracker: LayerTracker, task: Task,
                 batch: Any, loss: str = "loss", generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward and backward of the task's per-example losses, for ``tracker``'s hooks only.

    The parameters' ``.grad`` are left untouched (gradients are taken with respect to the tracked
    outputs), and it works inside Lightning's inference-mode loops. ``trainer`` gives the precision
    context; ``None`` runs outside Lightning. ``loss`` is ``"loss"`` or
    ``"sampled_loss"`` (the true Fisher's targets drawn from the model). Returns the losses ``(B,)``.

    Raises:
        ModelError: the loss is not one value per example.
        ConfigError: a tracked layer was never called through its ``forward`` (its hooks saw nothing).
    """
    precision = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), precision, exclusive(tracker):
        batch = clone_batch(batch)
        tracker.reset()
        tracker.force_grad = tracker.active = True
        try:
            losses = task.sampled_loss(pl_module, batch, generator) if loss == "sampled_loss" else task.loss(pl_module, batch)
            check_loss_shape(losses, (task.batch_size(batch),),
                             f"loss_fn (each example's summed loss; here {task.describe()}'s {loss})")
            tracker.check_seen(task.describe())
            if tracker.outputs:
                torch.autograd.grad(losses.sum(), tracker.outputs, allow_unused=True)
            tracker.check_reached()
        finally:
            tracker.active = tracker.force_grad = False
            tracker.reset()
    return losses.detach()


def _positions(task: Task, batch: Any) -> int | None:
    """Every input position of the batch (real tokens where a padding mask says): what a token mean
    divides by when no token mask is known (fixed-length tuple batches, as in nanoGPT)."""
    padding = task.padding_mask(batch)
    if padding is not None:
        return int(padding.sum())
    ids = task.input_ids(batch)  # a dict's input_ids, or a tuple batch's first 2-D integer tensor
    return None if ids is None else int(ids.numel())


class TrainLossScale:
    """The factor from the gradient the training backward carries to that of each example's summed loss.

    A training step usually returns a mean: over examples (``example_mean``), or over the tokens that
    carry a loss (``token_mean``), or a ``sum``. Hooks in ``fit`` see that loss's gradient, so every
    observed ``g`` is multiplied by this factor (also undoing gradient accumulation and a float16 loss
    scale). The token count is the task's ``token_mask`` (for Hugging Face-style batches: the labels
    that are not ``-100``, position 0 excluded); without one, every input position.

    **Checked, never guessed:** on the first training batch the module's own ``training_step`` is run
    once more without gradients (same random state, so dropout agrees; its logging muted) and its loss
    is compared with the task's summed per-example losses of the same batch. With ``auto`` (and no
    ``loss_reduction`` attribute on the module) the reduction whose normaliser matches is chosen; a
    given reduction that does not match, or no match at all, stops the run with both numbers.

    Args:
        reduction: ``auto``, ``sum``, ``example_mean`` or ``token_mean``.
        task: the module's task (its ``loss`` is needed for the check).
        owner: the callback, for messages.
        check: re-run ``training_step`` on the first batch to check (or find) the reduction. Without it a
            stated reduction (or the module's ``loss_reduction``) is trusted as it is.
    """

    def __init__(self, reduction: Reduction, task: Task, owner: str, check: bool = True) -> None:
        if reduction not in ("auto", *REDUCTIONS):
            raise ConfigError(f"train_loss_reduction must be one of auto, {', '.join(REDUCTIONS)}; got {reduction!r}")
        self.requested = reduction
        self.check = check
        self.task = task
        self.owner = owner
        self.reduction: str | None = None
        self.checked = False
        self._given = False
        self._tied: list[str] = []

    def setup(self, pl_module: LightningModule) -> None:
        """Resolve ``auto`` from the module's ``loss_reduction`` attribute and check the check can run."""
        self.reduction = self.requested if self.requested != "auto" else getattr(pl_module, "loss_reduction", None)
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise ConfigError(f"{self.owner}: {type(pl_module).__name__}.loss_reduction is {self.reduction!r}; "
                              f"it must be one of {', '.join(REDUCTIONS)}")
        self.checked = not self.check
        self._tied = []
        self._given = self.reduction is not None
        if not self.check and self.reduction is None:
            raise ConfigError(f"{self.owner}: check_train_loss is off, so train_loss_reduction must say how "
                              f"{type(pl_module).__name__}'s training step reduces its loss (it has no loss_reduction)")
        if self.check and not self.task.has_loss:
            raise ConfigError(
                f"{self.owner} cannot check how {type(pl_module).__name__}'s training step reduces its loss: give "
                f"loss_fn=f(module, batch) -> (B,) (each example's summed loss; the first batch is then checked "
                f"against training_step's loss), or state train_loss_reduction and set check_train_loss: false to "
                f"trust it unchecked"
            )

    def for_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> float | None:
        """The factor for this training batch, or ``None`` when it is not known yet (the first batch could
        not decide the reduction: the caller leaves that batch out rather than guess)."""
        normaliser = None
        if not self.checked and self.task.has_loss:
            tied = {self._normaliser(batch, name) for name in self._tied}
            if len(tied) == 1:  # the reductions still in question agree on this batch: no need to re-run
                normaliser = tied.pop()
            else:
                self._check(trainer, pl_module, batch, batch_idx)
                tied = {self._normaliser(batch, name) for name in self._tied}
                normaliser = tied.pop() if len(tied) == 1 else None
        if self.reduction is not None:
            normaliser = self._normaliser(batch, self.reduction)
        if normaliser is None:
            return None
        scale = normaliser * trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # float16 AMP multiplies the loss by its scale
            scale /= float(scaler.get_scale())
        return scale

    def _normaliser(self, batch: Any, reduction: str) -> float:
        if reduction == "sum":
            return 1.0
        if reduction == "example_mean":
            return float(self.task.batch_size(batch))
        mask = self.task.token_mask(batch)
        count = int(mask.sum()) if mask is not None else _positions(self.task, batch)
        if count is None:
            raise ConfigError(f"{self.owner}: cannot count the tokens of a token-mean training loss in this batch; give "
                              f"a Task with token_mask=f(batch) -> (B, T) bool, the tokens whose loss counts")
        return float(max(count, 1))

    def _check(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._tied = []
        if not getattr(pl_module, "automatic_optimization", True):
            self.checked = True  # manual optimisation: training_step steps the optimiser itself, it cannot be re-run
            if self.reduction is None:
                raise ConfigError(f"{self.owner}: {type(pl_module).__name__} optimises manually; set train_loss_reduction")
            return
        trained, summed = _training_and_summed_loss(trainer, pl_module, self.task, batch, batch_idx)
        if trained is None or not (math.isfinite(trained) and math.isfinite(summed)) or trained == 0:
            if not self._given:
                rank_zero_warn(f"{self.owner}: training batch {batch_idx} cannot show how training_step reduces its "
                               f"loss (it returned {trained}); that batch is left out and the next one is checked")
            return  # a stated reduction is checked on the next batch; an unknown one leaves this batch out
        ratio = summed / trained
        # Both losses are recomputed here in the parameters' precision (no autocast): only the reduction differs.
        tolerance = 1e-3 if any(p.dtype in (torch.float16, torch.bfloat16) for p in pl_module.parameters()) else 1e-5
        candidates = {name: self._normaliser(batch, name) for name in REDUCTIONS
                      if name != "token_mean" or self.task.token_mask(batch) is not None or _positions(self.task, batch)}
        matches = [name for name, value in candidates.items() if abs(ratio - value) <= tolerance * max(abs(value), 1.0)]
        shown = ", ".join(f"{name} {value:g}" for name, value in candidates.items())
        if self._given:
            tied = [name for name in matches if name != self.reduction]
            if self.reduction in matches and tied:  # it agrees, but so do others: check again where they differ
                self._tied = [self.reduction, *tied]
                return
            if self.reduction not in matches:
                raise ConfigError(
                    f"{self.owner}: train_loss_reduction is '{self.reduction}', but on the first training batch the "
                    f"summed per-example losses ({self.task.describe()}) are {ratio:.6g} × training_step's loss (the "
                    f"reductions would give: {shown}). Set train_loss_reduction to the one training_step uses, or make "
                    f"loss_fn compute the same loss as training_step (e.g. the same label shift and mask)"
                )
            self.checked = True
            return
        if not matches:
            raise ConfigError(
                f"{self.owner}: cannot tell how {type(pl_module).__name__}'s training step reduces its loss: the "
                f"summed per-example losses ({self.task.describe()}) are {ratio:.6g} × its loss on the first batch, "
                f"which fits none of {shown}. Make loss_fn compute the same loss as training_step (label shift, "
                f"ignored tokens), give a Task with token_mask for a token mean, or set train_loss_reduction"
            )
        values = {candidates[name] for name in matches}
        if len(matches) == 1:
            self.reduction = matches[0]
            self.checked = True
            rank_zero_info(f"{self.owner}: training_step's loss is a {self.reduction.replace('_', ' ')} of the "
                           f"per-example losses (checked on the first batch)")
        elif len(values) == 1:
            # Reductions that agree on this batch (one example: sum = example mean): its factor is known, and
            # so is every later batch's on which they agree too; the first on which they differ is checked.
            self._tied = matches
        # else: reductions with different factors both fit within the tolerance: undecided, batch left out


def _training_and_summed_loss(trainer: Trainer, pl_module: LightningModule, task: Task, batch: Any,
                              batch_idx: int) -> tuple[float | None, float]:
    """``training_step``'s loss and the task's summed losses of one batch, from the same random state."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    muted = {name: getattr(pl_module, name) for name in ("log", "log_dict")}
    # No autocast: both losses in the parameters' own precision, so that only their reduction differs.
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            torch.autocast(pl_module.device.type, enabled=False), exclusive(object()):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(pl_module.device) if devices else None
        for name in muted:
            setattr(pl_module, name, lambda *args, **kwargs: None)
        try:
            output = pl_module.training_step(batch, batch_idx)
        except LitAttribError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"re-running {type(pl_module).__name__}.training_step without gradients, to check how it reduces its "
                f"loss, failed ({type(exc).__name__}: {exc}); set train_loss_reduction and check_train_loss: false"
            ) from exc
        finally:
            for name in muted:
                delattr(pl_module, name)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, pl_module.device)
        losses = task.loss(pl_module, batch)
    if isinstance(output, dict):
        output = output.get("loss")
    if output is None:
        return None, 0.0
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise TrainingError(f"training_step returned {type(output).__name__}; expected a scalar loss tensor")
    check_loss_shape(losses, (task.batch_size(batch),), f"loss_fn (each example's summed loss; here {task.describe()})")
    return float(output.double()), float(losses.double().sum())
