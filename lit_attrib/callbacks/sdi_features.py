"""The machinery of :class:`~lit_attrib.callbacks.SketchedGradCallback` both modes share: the tracked
modules and their steps, per-example gradient features (sketches or exact) from one own backward, the
queries' features, and the artifact (``sdi.safetensors``, ``sdi.json``, ``trajectories.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.scores import save_tensors
from lit_attrib.artifacts.sdi import FORMAT, save_sdi, step_shares
from lit_attrib.callbacks._common import (
    ArtifactCallback,
    check_context,
    context_length,
    show_progress,
)
from lit_attrib.callbacks._scoring import tensorboard_text
from lit_attrib.engine.data import (
    ExampleIds,
    iterate_batches,
    resolve_loader,
    source_name,
)
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_parameter_modules
from lit_attrib.errors import DataError, ModelError, TrainingError
from lit_attrib.io import atomic_path, write_json
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.step_features import GradientFeatures, per_example_module, step_layout
from lit_attrib.ops.tracin import sum_by_index

__all__: list[str] = []


class _SketchedGradients(ArtifactCallback):
    """Base of :class:`SketchedGradCallback` (see there); its two modes are mixins in ``sdi_checkpoints``
    and ``sdi_online``."""

    # --------------------------------------------------------------------------- set-up
    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_overwrite(trainer)
        if self._tracker is not None:  # hooks of an earlier pass that ended in an exception
            self._tracker.detach()
        owner = f"{type(self).__name__}[{self.name}]"
        self._task = resolve_task(pl_module, self.task, self.loss_fn, owner=owner)
        self._ids = ExampleIds(self._task, owner)
        self.layers = find_parameter_modules(pl_module, self.target_modules)
        if self.strict and not self.exact:
            unsupported = [f"{name} ({type(layer.module).__name__})" for name, layer in self.layers.items()
                           if layer.kind == "other" and not per_example_module(layer.module)]
            if unsupported:
                raise ModelError(
                    f"{type(self).__name__} has no sketch for the parameters of {unsupported[:8]}: only linear, "
                    f"embedding and norm layers are sketched during backprop. Set exact: true (full per-example "
                    f"gradients, small models), leave them out of target_modules, or set strict: false to sketch "
                    f"their per-example gradients taken through torch.func"
                )
        canonical = {}
        for parameter_name, parameter in pl_module.named_parameters(remove_duplicate=False):
            canonical.setdefault(id(parameter), parameter_name)
        self._features = GradientFeatures(self.layers, self.sketch_dim, self.exact, self.seed, self.dtype,
                                   pl_module.device, canonical, self.sketch_sharing)
        self._tracker = LayerTracker(self.layers, on_gradient=self._on_gradient).attach()
        self._tracker.active = False
        self._context = context_length(pl_module)
        self._tracin.clear()
        self.step_names = self._steps = None
        size = "exact gradients" if self.exact else f"a {self.sketch_sharing} sketch of m = {self.sketch_dim}"
        shares = ", ".join(f"{b['parameters']} {b['share']:.1%}" for b in self._features.blocks[:6])
        rank_zero_info(f"{type(self).__name__}[{self.name}]: {len(self.layers)} modules, "
                       f"{sum(b['numel'] for b in self._features.blocks):,} parameters in {size} "
                       f"(shares: {shares}{', …' if len(self._features.blocks) > 6 else ''})")

    # ------------------------------------------------------------------------ gradients
    def _on_gradient(self, layer: LayerInfo, use: int, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        if self._collect is None:
            return
        if gradients.shape[0] != self._batch_size:
            raise ModelError(
                f"{layer.name}'s output has {gradients.shape[0]} rows for a batch of {self._batch_size}: it is shared by "
                f"the whole batch (e.g. position embeddings of arange(T) broadcast later), so per-example gradients "
                f"cannot be taken from it. Leave it out of target_modules, or give it per-example inputs"
            )
        if not self._layout_checked:  # the forward is complete once the first gradient arrives
            self._check_layout()
            self._layout_checked = True
        active, self._tracker.active = self._tracker.active, False  # torch.func re-runs norm layers
        try:
            self._collect(layer, self._steps[layer.name][use], activations, gradients)
        finally:
            self._tracker.active = active

    def _check_layout(self) -> None:
        """Steps from this forward's calls; the first forward fixes them, later ones must agree."""
        uses = dict(self._tracker.uses)
        if missing := [name for name in self.layers if name not in uses]:
            raise ModelError(f"tracked modules {missing[:8]} were not called in the forward pass; leave them out of "
                             f"target_modules")
        names, steps = step_layout(uses, self._tracker.calls)
        if self._steps is None:
            self.step_names, self._steps = names, steps
        elif steps != self._steps:
            raise ModelError(f"the tracked modules' calls changed between forward passes (steps {self.step_names} "
                             f"before, {names} now); SDI needs the same number of loop steps in every forward")

    def _example_features(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                          per_step: bool) -> torch.Tensor:
        """One own forward/backward: ``(B, S, size)`` per step, or ``(B, size)`` summed over steps."""
        holder: dict[str, torch.Tensor] = {}

        def collect(layer: LayerInfo, step: int, a: torch.Tensor, g: torch.Tensor) -> None:
            if not per_step:  # the sum over uses, sketched once per module below
                uses = len(self._steps[layer.name])
                holder.setdefault(layer.name, []).append(self._features.raw(layer, a, g, uses))
                return
            features = self._features(layer, a, g)
            if "x" not in holder:
                holder["x"] = features.new_zeros(features.shape[0], len(self.step_names), features.shape[1])
            holder["x"][:, step].add_(features)

        self._collect = collect
        self._layout_checked = False
        self._batch_size = self._task.batch_size(batch)
        try:
            losses = own_backward(trainer, pl_module, self._tracker, self._task, batch)
        finally:
            self._collect = None
        if not bool(torch.isfinite(losses).all()):
            raise TrainingError(f"{type(self).__name__}[{self.name}]: non-finite loss for rows "
                                f"{self._task.example_ids(batch)}")
        if not holder:
            raise ModelError(f"the loss of {type(self).__name__}[{self.name}] reached none of the tracked modules; "
                             f"check target_modules")
        return holder["x"] if per_step else self._finish_raw(holder)

    def _finish_raw(self, raws: dict[str, list]) -> torch.Tensor:
        """``(B, size)``: the modules' summed contributions, sketched (or placed) and added."""
        features = None
        for name, raw in raws.items():
            part = self._features.finish(self.layers[name], raw)
            features = part if features is None else features + part
        return features

    def _query_features(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query's features (all processes compute all), in dataset index order: ``(N_q, S, size)``
        in ``sdi`` mode, ``(N_q, 1, size)`` in ``tracin`` mode."""
        loader = resolve_loader(self.queries, trainer, pl_module, "the queries")
        ids = ExampleIds(self._task, f"{type(self).__name__}[{self.name}]")
        parts, indices, count = [], [], 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in tqdm(iterate_batches(trainer, pl_module, loader), desc=f"{self.name}: queries", leave=False,
                              disable=not show_progress(trainer)):
                if count == 0:
                    ids.check(loader, batch, trainer, "the queries", sharded=False)
                check_context(self._task, batch, self._context, "a query")
                features = self._example_features(trainer, pl_module, batch, per_step=True)
                parts.append(features if self.mode == "sdi" else features.sum(1, keepdim=True))
                indices.append(ids(batch))
                count += len(indices[-1])
        finally:
            pl_module.train(was_training)
        if not parts:
            raise DataError(f"the queries are empty: {source_name(self.queries)} gave no examples")
        indices = torch.cat(indices)
        order = torch.argsort(indices)
        if len(indices.unique()) != len(indices):
            raise DataError(f"the queries ({source_name(self.queries)}) repeat example ids; each query needs its own")
        return torch.cat(parts)[order.to(parts[0].device)], indices[order]

    # ------------------------------------------------------------------------- the artifact
    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sum every process's rows by index on rank zero and write the artifact."""
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        indices, rows = self._tracin.rows()
        part = folder / f".{self.name}-part-rank{trainer.global_rank:03d}.safetensors"
        save_tensors(part, {"index": indices, "rows": rows}, FORMAT)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [load_file(str(folder / f".{self.name}-part-rank{r:03d}.safetensors"))
                     for r in range(trainer.world_size)]
            unique, sdi = sum_by_index(torch.cat([p["index"] for p in parts]), torch.cat([p["rows"] for p in parts]))
            (folder / "sdi.json").unlink(missing_ok=True)  # the old metadata must not vouch for new tensors
            self._write(trainer, folder, unique, sdi)
        trainer.strategy.barrier()
        (folder / f".{self.name}-part-rank{trainer.global_rank:03d}.safetensors").unlink(missing_ok=True)
        self._tracin.clear()
        self._tracin.set_queries(None)  # the query sketches can be large; the indices stay for the artifact
        self._tracker.detach()

    def _write(self, trainer: Trainer, folder: Path, train_indices: torch.Tensor, sdi: torch.Tensor) -> None:
        query_indices = self._query_indices
        steps = self.step_names if self.mode == "sdi" else ["all steps"]
        save_sdi(folder, sdi, train_indices, query_indices, self.mode == "sdi", [c["eta"] for c in self._used],
                 self.top_k)
        if self.plots:
            self._plot(trainer, folder, sdi, train_indices, steps)
        share = step_shares(sdi)
        table = "| step | share of |influence| |\n|---|---|\n" + "\n".join(
            f"| {name} | {value:.1%} |" for name, value in zip(steps, share))
        tensorboard_text(trainer, f"{self.name}/steps", table)
        write_json(folder / "sdi.json", {
            "format": FORMAT,
            "name": self.name,
            "arguments": self.arguments(),
            "mode": "checkpoints" if self._used else "online",
            "steps": steps,
            "step_share_of_abs_influence": dict(zip(steps, [round(v, 6) for v in share])),
            "checkpoints": self._used,
            "shape": {"train": len(train_indices), "query": len(query_indices), "steps": len(steps)},
            "sketch": {"exact": self.exact, "dimension": self._features.size, "seed": self.seed,
                       "blocks": self._features.blocks,
                       "sharing": "exact" if self.exact else self.sketch_sharing,
                       "note": ("each block's coordinates are [start, width) of the feature vector; shared: every "
                                "block uses all of them with its own hash tables")},
            "modules": {name: {"type": type(layer.module).__name__, "uses": len(self._steps[name]),
                               "steps": [steps[s] if self.mode == "sdi" else steps[0] for s in self._steps[name]]}
                        for name, layer in self.layers.items()} if self._steps else {},
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
        })
        rank_zero_info(f"{type(self).__name__}[{self.name}]: wrote {tuple(sdi.shape)} to {folder}")

    def _plot(self, trainer: Trainer, folder: Path, sdi: torch.Tensor, train_indices: torch.Tensor,
              steps: list[str]) -> None:
        import matplotlib.pyplot as plt

        from lit_attrib.plotting import sdi_trajectory_figure

        figure = sdi_trajectory_figure(sdi, train_indices, steps, top_k=min(max(self.top_k, 1), 8))
        with atomic_path(folder / "trajectories.png") as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"{self.name}/trajectories", figure, global_step=trainer.global_step)  # closes it
        else:
            plt.close(figure)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._tracker is not None:
            self._tracker.detach()
        self._online = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._tracker is not None:
            self._tracker.detach()
