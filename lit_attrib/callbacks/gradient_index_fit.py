"""Fit-time collection of :class:`~lit_attrib.callbacks.GradientIndexCallback` (a mixin, like online SDI):
rows from the real training backward, rescaled by :class:`~lit_attrib.engine.TrainLossScale` to each
example's summed loss, weighted by each step's learning rate and optionally divided by Adam's
``sqrt(v̂) + ε`` of that step. A resumed ``fit`` keeps the parts its checkpoint lists.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_attrib.artifacts.index import part_name
from lit_attrib.callbacks._common import ArtifactCallback
from lit_attrib.engine.data import ExampleIds
from lit_attrib.engine.gradient_pass import TrainLossScale
from lit_attrib.errors import ArtifactError, ConfigError, TrainingError
from lit_attrib.layers import LayerInfo

__all__: list[str] = []


class _FitCollection(ArtifactCallback):
    """The ``fit`` half of :class:`~lit_attrib.callbacks.GradientIndexCallback`; the set-up, the store and the
    ``predict`` half live there (``_setup``, ``_prepare_folder``, ``_keep_batch``, ``_finish``)."""

    # --------------------------------------------------------------------------------- fit
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" not in self.stages:
            return
        state, self._pending_state = self._pending_state, None
        if state is not None and state.get("finished"):
            rank_zero_info(f"{self._owner}: the checkpoint's run already wrote its index; this fit adds nothing to it")
            self._stage = None
            return
        if self.normalisation == "adam" and trainer.accumulate_grad_batches > 1:
            raise ConfigError(f"{self._owner}: normalisation: adam divides by the second moment of the optimizer step "
                              f"that uses each batch, which gradient accumulation defers; set "
                              f"accumulate_grad_batches: 1 or normalisation: none")
        self._setup(trainer, pl_module, "fit", needs=())
        self._train_scale = TrainLossScale(self.train_loss_reduction, self._task, self._owner,
                                           check=self.check_train_loss)
        self._train_scale.setup(pl_module)
        self._slots: dict[str, list] | None = None
        self._checked_layers = False
        self._collecting = False
        self._position = 0
        self._stats = {"epochs": [], "steps": 0, "last_step": -1, "first_step": None, "skipped_steps": 0,
                       "learning_rate": None}
        keep = None
        if state is not None:
            if state.get("arguments") != self._json_arguments():
                raise ArtifactError(f"{self._owner}: the checkpoint's index was built with other arguments "
                                    f"({state.get('arguments')}); resume with the same ones")
            keep = {part_name(rank, sequence) for rank, count in enumerate(state["part_counts"])
                    for sequence in range(count)}
            self._stats.update(state.get("stats", {}))
        self._prepare_folder(trainer, keep, None)

    def _collects(self, trainer: Trainer) -> bool:
        return (self._stage == "fit" and not self._finished
                and (self.epochs is None or trainer.current_epoch in self.epochs)
                and trainer.global_step % self.every_n_steps == 0)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._position = 0  # rows without ids are numbered in loader order, from 0 each epoch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._collecting = False
        if self._stage != "fit" or self._finished:
            return
        ids = self._fit_ids(batch, batch_idx)  # every batch: positions count the batches not collected too
        if not self._collects(trainer):
            return
        if self._slots is None:
            self._slots = self._optimizer_slots(trainer)
            ExampleIds(self._task, self._owner).check(trainer.train_dataloader, batch, trainer, "the training set",
                                                      sharded=True)
        scale = self._train_scale.for_batch(trainer, pl_module, batch, batch_idx)
        if scale is None:  # the first batch could not show the loss's reduction: left out, never guessed
            return
        self._ids = ids
        self._step = trainer.global_step
        self._rates = {name: self._learning_rate(name) for name in self._layers}
        if self.normalisation == "adam":
            self._adam_steps = {name: _adam_step(slot) for name, slots in self._slots.items() for slot in slots[:1]}
        self._accumulator.begin_batch(len(self._ids), self._task.padding_mask(batch), gradient_scale=scale)
        self._uses = []
        self._tracker.attach()  # hooked only on the batches it collects: the others run at full speed
        self._tracker.reset()
        self._tracker.active = self._collecting = True

    def _on_gradient(self, layer: LayerInfo, use: int, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        if self.normalisation == "adam" and self._stage == "fit":
            self._uses.append((layer, activations, gradients))  # divided once the optimizer has stepped
        else:
            self._accumulator.add(layer, activations, gradients)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._collecting:
            return
        self._collecting = self._tracker.active = False
        self._tracker.detach()
        if not self._tracker.reached:  # training_step returned None: no backward, nothing to add
            self._accumulator.end_batch()
            self._accumulator.take_sums()
            return
        if not self._checked_layers:
            self._tracker.check_seen("training_step")
            self._tracker.check_reached()
            self._checked_layers = True
        if self.normalisation == "adam":
            denominators = self._adam_denominators()
            if denominators is None:  # the optimizer skipped this step (a float16 overflow): it taught nothing
                self._skip_batch()
                return
            for layer, activations, gradients in self._uses:
                self._accumulator.add(layer, activations, gradients, denominators[layer.name])
            self._uses = []
        rows = self._accumulator.end_batch(self._rates if self.weighting == "learning_rate" else None)
        if not bool(torch.isfinite(rows).all()):
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                self._skip_batch()  # the loss scaler skips the step on the same overflow
                return
            raise TrainingError(f"{self._owner}: non-finite gradients at training step {trainer.global_step} for rows "
                                f"{self._ids.tolist()[:8]}")
        self._record_step(trainer)
        self._keep_batch(trainer, rows, self._ids)

    def _skip_batch(self) -> None:
        self._accumulator.end_batch()
        self._accumulator.take_sums()
        self._uses = []
        self._stats["skipped_steps"] += 1

    def _record_step(self, trainer: Trainer) -> None:
        stats, step = self._stats, self._step
        if step != stats["last_step"]:
            stats["steps"] += 1
            stats["last_step"] = step
            stats["first_step"] = step if stats["first_step"] is None else stats["first_step"]
        if trainer.current_epoch not in stats["epochs"]:
            stats["epochs"].append(trainer.current_epoch)
        low, high = min(self._rates.values()), max(self._rates.values())
        seen = stats["learning_rate"]
        stats["learning_rate"] = [low, high] if seen is None else [min(seen[0], low), max(seen[1], high)]

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage != "fit" or self._finished:
            return
        stats = {key: value for key, value in self._stats.items() if key != "last_step"}
        if stats["steps"] == 0:
            rank_zero_warn(f"{self._owner}: no training step was collected (epochs {self.epochs}, every_n_steps "
                           f"{self.every_n_steps}); the index holds no rows")
        self._finish(trainer, {"stage": "fit", "weighting": self.weighting, "normalisation": self.normalisation,
                               "every_n_steps": self.every_n_steps, **stats})

    def _fit_ids(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The batch's dataset indices: the task's ids, or positions in the (checked unshuffled) loader.

        Positions are refused in an epoch resumed part-way (from a checkpoint taken mid-epoch): Lightning
        restarts a plain loader from its first batch then, a stateful one from where it stopped; which of the
        two happened cannot be known from here."""
        ids = self._task.example_ids(batch)
        size = self._task.batch_size(batch)
        if ids is None:
            if batch_idx > 0 and self._position == 0:
                raise ConfigError(f"{self._owner}: this run resumed part-way through an epoch, at batch {batch_idx}, and "
                                  f"the batches carry no example ids, so which examples they hold is not known; give "
                                  f"a Task with example_ids=f(batch) -> (B,) (or an 'index' entry in dict batches), or "
                                  f"resume from a checkpoint taken at the end of an epoch")
            ids = torch.arange(self._position, self._position + size)
            self._position += size
        elif len(ids) != size:
            raise ConfigError(f"{self._owner}: example_ids gave {len(ids)} ids for a batch of {size} examples")
        return ids

    # ----------------------------------------------------------------- learning rates, Adam
    def _optimizer_slots(self, trainer: Trainer) -> dict[str, list]:
        """Each layer's ``[(optimizer, group, parameter)]`` for its weight (and bias)."""
        owners = {id(p): (optimizer, group) for optimizer in trainer.optimizers for group in optimizer.param_groups
                  for p in group["params"]}
        slots, problems = {}, []
        for name, layer in self._layers.items():
            parameters = [layer.module.weight] + ([layer.module.bias] if layer.has_bias else [])
            missing = [kind for kind, p in zip(("weight", "bias"), parameters) if id(p) not in owners]
            if missing and (self.weighting == "learning_rate" or self.normalisation == "adam"):
                problems.append(f"{name}'s {' and '.join(missing)} is trained by no optimizer")
                continue
            slots[name] = [(*owners[id(p)], p) for p in parameters if id(p) in owners]
            if self.normalisation == "adam" and not isinstance(slots[name][0][0], (torch.optim.Adam, torch.optim.AdamW)):
                problems.append(f"{name} is trained by {type(slots[name][0][0]).__name__}, not torch.optim.Adam/AdamW")
        if problems:
            fix = ("normalisation: adam divides by Adam's second moment of each trained layer" if
                   self.normalisation == "adam" else "weighting: learning_rate weights each layer's rows by the "
                   "learning rate it is trained with; set weighting: none")
            raise ConfigError(f"{self._owner}: " + "; ".join(problems) + f" ({fix}; or leave such layers out of "
                              f"target_modules)")
        return slots

    def _learning_rate(self, name: str) -> float:
        rates = {float(group["lr"]) for _, group, _ in self._slots.get(name, [])}
        if len(rates) > 1:
            raise ConfigError(f"{self._owner}: {name}'s weight and bias are trained with different learning rates "
                              f"{sorted(rates)}; a layer's row is weighted by one: put them in one parameter group, or "
                              f"set weighting: none")
        return rates.pop() if rates else 1.0

    def _adam_denominators(self) -> dict[str, torch.Tensor] | None:
        """Each layer's ``sqrt(v̂) + ε`` of the step just taken, ``(out, in + bias)``; ``None`` when the
        optimizer did not step on this batch."""
        denominators = {}
        for name, layer in self._layers.items():
            parts = []
            for optimizer, group, parameter in self._slots[name]:
                state = optimizer.state.get(parameter, {})
                step = _adam_step((optimizer, group, parameter))
                if step != self._adam_steps[name] + 1 or "exp_avg_sq" not in state:
                    return None
                second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                correction = 1 - group["betas"][1] ** step
                parts.append(second.sqrt().div_(math.sqrt(correction)).add_(group["eps"]))  # one temporary
            weight = parts[0].T if layer.kind == "conv1d" else parts[0]  # (out, in)
            denominators[name] = torch.cat([weight, parts[1][:, None]], 1) if layer.has_bias else weight
        return denominators

    # ------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """In ``fit``: which parts every process had written when the checkpoint was taken (each process
        writes its rows first; Lightning builds checkpoints on every process, so the count is gathered)."""
        if self._finished:
            return {"arguments": self._json_arguments(), "finished": True}
        if self._stage != "fit" or self._accumulator is None:
            return {}
        trainer = self._trainer_of_state
        self._flush(trainer)
        counts = torch.zeros(trainer.world_size, dtype=torch.float64, device=trainer.strategy.root_device)
        counts[trainer.global_rank] = self._sequence
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return {"arguments": self._json_arguments(), "part_counts": [int(c) for c in counts.tolist()],
                "stats": dict(self._stats)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict or None  # applied when fit starts (the layers exist by then)


def _adam_step(slot: tuple) -> float:
    """How many steps Adam has taken on a parameter (0 before its first)."""
    optimizer, _, parameter = slot
    step = optimizer.state.get(parameter, {}).get("step", 0)
    return float(step)
