"""GradientIndexCallback: compress every training example's gradient once, in a ``predict`` pass, into a
gradient index that :class:`lit_attrib.index.GradientIndex` answers queries from.

First part of the gradient-index work: the ``predict`` pass, the store, the projected K-FAC curvature
and the Python query API. Collection inside ``fit``, resuming a killed pass, the ``lit-attrib`` query
command and approximate search are still to come.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_attrib.artifacts.index import METADATA_FILE, write_curvature, write_metadata, write_shard
from lit_attrib.callbacks._common import ArtifactCallback, check_context, context_length, tensors_checksum
from lit_attrib.engine.data import ExampleIds, current_loader, require_one_loader
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import LossFn, Task, function_name, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ConfigError, TrainingError
from lit_attrib.ops.kfac import eigendecompose
from lit_attrib.ops.projection import ProjectedGradients

__all__ = ["GradientIndexCallback"]

_STORAGE = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32),
            "float64": (torch.float64, np.float64)}


class GradientIndexCallback(ArtifactCallback):
    """Store each example's projected gradient ``P_out DW P_inᵀ`` of the tracked layers, once.

    Run it in ``lit-attrib predict`` over the training set as whole examples (like ``InfluenceCallback``).
    Each example's row is keyed by its dataset index. The K-FAC curvature of the projected activations
    and gradients is fitted in the same pass. Query with :class:`lit_attrib.index.GradientIndex`.

    Args:
        target_modules: fnmatch patterns of the linear layers to index.
        projection_dim: ``k`` per side: each layer keeps ``min(k, out) × min(k, in)``; ``null`` keeps every
            dimension (exact scores, large rows).
        seed: seed of the projections (recorded; queries use the same ones).
        storage_dtype: ``float16`` (half the disk), ``float32``, or ``float64`` rows (exact references).
        curvature: fit the projected K-FAC factors in the same pass.
        dtype: precision of the computation.
        loss_fn: each example's summed loss (shortcut for ``task=Task(loss_fn=...)``).
        task: what lit_attrib needs to know about the module's batches and loss.
        output_dir: the index folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name.
        overwrite: replace an index made with other arguments.
    """

    metadata_file = METADATA_FILE

    def __init__(
        self,
        target_modules: list[str] | None = None,
        projection_dim: int | None = 32,
        seed: int = 0,
        storage_dtype: Literal["float16", "float32", "float64"] = "float16",
        curvature: bool = True,
        dtype: Literal["float32", "float64"] = "float32",
        loss_fn: LossFn | None = None,
        task: Task | None = None,
        output_dir: str | None = None,
        name: str = "index",
        overwrite: bool = False,
    ) -> None:
        problems = []
        if projection_dim is not None and projection_dim < 1:
            problems.append(f"projection_dim must be at least 1 (or null for every dimension); got {projection_dim}")
        if storage_dtype not in _STORAGE:
            problems.append(f"storage_dtype must be one of {list(_STORAGE)}; got {storage_dtype!r}")
        if dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64; got {dtype!r}")
        if problems:
            raise ConfigError("invalid GradientIndexCallback arguments:\n  - " + "\n  - ".join(problems))
        self.target_modules = list(target_modules or ["*.mlp.*_proj"])
        self.projection_dim = projection_dim
        self.seed = seed
        self.storage_dtype = storage_dtype
        self.curvature = curvature
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.loss_fn = loss_fn
        self.task = task
        self.output_dir = output_dir
        self.name = name
        self.overwrite = overwrite
        self._accumulator: ProjectedGradients | None = None
        self._tracker: LayerTracker | None = None
        self._rows: list[np.ndarray] = []
        self._ids: list[torch.Tensor] = []

    @override
    def arguments(self) -> dict:
        return {"target_modules": self.target_modules, "projection_dim": self.projection_dim, "seed": self.seed,
                "storage_dtype": self.storage_dtype, "curvature": self.curvature,
                "dtype": str(self.dtype).replace("torch.", ""),
                "loss_fn": function_name(self.loss_fn)}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        owner = f"{type(self).__name__}[{self.name}]"
        self.check_overwrite(trainer)
        self._task = resolve_task(pl_module, self.task, self.loss_fn, owner=owner)
        self._example_ids = ExampleIds(self._task, owner)
        require_one_loader(trainer, owner)
        self._layers = find_layers(pl_module, self.target_modules)
        k = self.projection_dim
        sizes = {name: (layer.gradient_shape[0] if k is None else min(k, layer.gradient_shape[0]),
                        layer.gradient_shape[1] if k is None else min(k, layer.gradient_shape[1]))
                 for name, layer in self._layers.items()}
        self._accumulator = ProjectedGradients(self._layers, sizes, self.seed, self.dtype, pl_module.device,
                                               curvature=self.curvature)
        self._tracker = LayerTracker(self._layers, on_gradient=lambda layer, use, a, g: self._accumulator.add(
            layer, a, g)).attach()
        self._tracker.active = False
        self._context = context_length(pl_module)
        self._rows, self._ids = [], []
        rank_zero_info(f"{owner}: {len(self._layers)} layer(s), rows of {self._accumulator.width} "
                       f"{self.storage_dtype} values per example")

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._accumulator is None:
            return
        if batch_idx == 0:
            self._example_ids.check(current_loader(trainer, dataloader_idx), batch, trainer, "the indexed examples",
                                    sharded=True)
        ids = self._example_ids(batch)
        check_context(self._task, batch, self._context, "an example")
        self._accumulator.begin_batch(len(ids), self._task.padding_mask(batch))
        losses = own_backward(trainer, pl_module, self._tracker, self._task, batch)
        rows = self._accumulator.end_batch()
        if not (bool(torch.isfinite(losses).all()) and bool(torch.isfinite(rows).all())):
            raise TrainingError(f"{type(self).__name__}[{self.name}]: non-finite gradients for rows {ids.tolist()[:8]}")
        self._rows.append(rows.to(_STORAGE[self.storage_dtype][0]).cpu().numpy())
        self._ids.append(ids)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._accumulator is None:
            return
        self._tracker.detach()
        folder = self.folder(trainer)
        width = self._accumulator.width
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, width), _STORAGE[self.storage_dtype][1])
        ids = torch.cat(self._ids).numpy() if self._ids else np.zeros(0, np.int64)
        (folder / METADATA_FILE).unlink(missing_ok=True) if trainer.is_global_zero else None
        trainer.strategy.barrier()
        write_shard(folder, trainer.global_rank, rows, ids)
        if self.curvature:
            self._accumulator.reduce(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            tensors = {}
            for name, factors in (self._accumulator.covariances().items() if self.curvature else []):
                for side in ("activation", "gradient"):
                    values, vectors = eigendecompose(factors[f"{side}_covariance"])
                    tensors[f"{name}.{side}_eigenvalues"] = values
                    tensors[f"{name}.{side}_eigenvectors"] = vectors
            if tensors:
                write_curvature(folder, tensors)
            write_metadata(folder, {
                "name": self.name,
                "arguments": self.arguments(),
                "layers": {name: {**layer.describe(), "gradient_shape": list(layer.gradient_shape),
                                  "k_out": self._accumulator.sizes[name][0], "k_in": self._accumulator.sizes[name][1]}
                           for name, layer in self._layers.items()},
                "seed": self.seed,
                "width": width,
                "storage_dtype": self.storage_dtype,
                "shards": [[f"rows-rank{r:03d}.npy", f"ids-rank{r:03d}.npy"] for r in range(trainer.world_size)],
                "weights": tensors_checksum(p for layer in self._layers.values() for p in layer.module.parameters()),
                "global_step": trainer.global_step,
                "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
            })
            rank_zero_info(f"{type(self).__name__}[{self.name}]: index of {len(ids)} rows written to {Path(folder)}")
        trainer.strategy.barrier()
        self._accumulator = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._tracker is not None:
            self._tracker.detach()
