"""Online mode of :class:`~lit_attrib.callbacks.SketchedGradCallback` (TracIn-ideal, in ``fit``): the real
training backward gives each batch's features, rescaled from the training loss's reduction to each
example's summed loss; the queries are sketched again every ``every_n_steps`` optimizer steps.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lit_attrib.callbacks.sdi_features import _SketchedGradients
from lit_attrib.engine.gradient_pass import TrainLossScale
from lit_attrib.errors import TrainingError
from lit_attrib.layers import LayerInfo

__all__: list[str] = []


class _OnlineTracIn(_SketchedGradients):
    """TracIn during ``fit`` (a mixin of :class:`SketchedGradCallback`)."""

    # ------------------------------------------------------------------------- online mode
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._online = self.checkpoints is None
        if not self._online:
            return
        restored = self._tracin.state_dict()  # rows of a resumed run, loaded before fit starts
        self._setup(trainer, pl_module)
        self._tracin.load_state_dict(restored)
        self._refreshed_at = -1
        self._train_scale = TrainLossScale(self.train_loss_reduction, self._task, f"{type(self).__name__}[{self.name}]",
                                            check=self.check_train_loss)
        self._train_scale.setup(pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._online:
            self._ids.reset()  # rows without ids are numbered in loader order, from 0 each epoch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._online:
            return
        step = trainer.global_step
        stale = self._tracin.queries is None  # e.g. resumed from a checkpoint between two refreshes
        if (step % self.every_n_steps == 0 or stale) and self._refreshed_at != step:
            queries, self._query_indices = self._query_features(trainer, pl_module)
            self._tracin.set_queries(queries)
            self._refreshed_at = step
        if batch_idx == 0:
            self._ids.check(trainer.train_dataloader, batch, trainer, "the training set", sharded=True)
        self._batch_ids = self._ids(batch)
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._scale = self._train_scale.for_batch(trainer, pl_module, batch, batch_idx)
        self._train_features = {}
        if self._scale is None:  # the reduction of this batch's loss is not known yet: leave it out
            return

        def collect(layer: LayerInfo, step: int, a: torch.Tensor, g: torch.Tensor) -> None:
            uses = len(self._steps[layer.name])
            self._train_features.setdefault(layer.name, []).append(self._features.raw(layer, a, g, uses))

        self._collect = collect
        self._layout_checked = False
        self._batch_size = len(self._batch_ids)
        self._tracker.reset()
        self._tracker.active = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._online or self._tracker is None:
            return
        self._tracker.active = False
        self._collect = None
        self._tracker.reset()
        if not self._train_features:  # a skipped step (e.g. training_step returned None)
            return
        train = self._finish_raw(self._train_features) * self._scale
        self._train_features = {}
        if not bool(torch.isfinite(train).all()):
            raise TrainingError(f"{type(self).__name__}[{self.name}]: non-finite training gradient sketch at step "
                                f"{trainer.global_step}")
        self._tracin.add(self._batch_ids, train, self._lr)


    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._online:
            return
        self._online = False
        self._finish(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._tracin.state_dict() if self._online else {}
        if state:
            state["steps"] = self.step_names
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracin.load_state_dict(state_dict)

