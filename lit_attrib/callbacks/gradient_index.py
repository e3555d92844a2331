"""GradientIndexCallback: compress every training example's gradient once, in a ``predict`` pass or inside the
user's own ``fit``, into a gradient index that :class:`lit_attrib.index.GradientIndex` answers queries from.

In ``predict`` it runs a forward/backward of its own per batch (like ``InfluenceCallback``). In ``fit`` it
observes the real training backward (rescaled by the engine's :class:`~lit_attrib.engine.TrainLossScale`
to each example's summed loss): no extra pass. Either way rows go to disk in atomic parts as the pass
runs, so a killed build resumes (``predict``: ``resume: true``; ``fit``: from a Lightning checkpoint),
and at the end each process merges every part into its one shard (:mod:`lit_attrib.artifacts.index`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_attrib.artifacts.index import (
    METADATA_FILE,
    list_parts,
    merge_parts,
    part_ids,
    part_sums,
    read_progress,
    remove_build_files,
    shard_names,
    storage_tensor_dtype,
    write_curvature,
    write_metadata,
    write_part,
    write_progress,
    write_shard,
)
from lit_attrib.callbacks._common import check_context, context_length, layers_checksum, tensors_checksum
from lit_attrib.callbacks.gradient_index_fit import _FitCollection
from lit_attrib.engine.data import ExampleIds, current_loader, require_one_loader
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import LossFn, Task, function_name, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ArtifactError, ConfigError, TrainingError
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import eigendecompose
from lit_attrib.ops.projection import ProjectedGradients

__all__ = ["GradientIndexCallback"]

_STORAGE = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_PART_BYTES = 1 << 28  # a part holds about 256 MB of rows unless part_rows says otherwise


class GradientIndexCallback(_FitCollection):
    """Store each example's projected gradient ``P_out DW P_inᵀ`` of the tracked layers, once.

    **predict**: one row per example of the predict loader (a forward/backward of the callback's own), at
    the module's current weights. **fit**: every collected training step adds, to the row of each example
    in its batch, that example's projected gradient from the real backward, times the step's learning
    rate (``weighting: learning_rate``, TracIn-style): after training, row ``m`` is
    ``Σ_t η_t P ∇L(z_m; θ_t)`` over the steps ``t`` that saw example ``m`` (once per epoch; a
    ``DistributedSampler``'s padding repeats are summed too, as training used them). The rows are queried
    against the query gradient at the final weights (``index.json`` says how the rows were collected).
    Rows are keyed by dataset index (the task's example ids, or loader positions when unshuffled) and stored
    in index order. The K-FAC curvature of the projected ``a`` and ``g`` is fitted from the same backward
    passes (unweighted, over every collected token).

    ``normalisation: adam`` (fit only) divides each example's gradient elementwise by the denominator
    ``sqrt(v̂_t) + ε`` Adam applied in that very step (LESS, TrackStar). That division does not commute with
    the Kronecker-factored projection, so for it each example's ``out × in`` gradient of each layer is formed
    (a few examples at a time) and divided exactly: it costs about one more weight gradient per layer and
    keeps each batch's ``a`` and ``g`` until the optimizer has stepped. It needs ``torch.optim.Adam``/``AdamW``
    training the tracked layers, no gradient accumulation, and ``curvature: false`` (the projected K-FAC
    factors describe unnormalised gradients).

    Args:
        target_modules: fnmatch patterns of the linear layers to index.
        projection_dim: ``k`` per side: each layer keeps ``min(k, out) × min(k, in)``; ``null`` keeps every
            dimension (exact scores, large rows).
        seed: seed of the projections (recorded; queries use the same ones).
        storage_dtype: ``float16`` (half the disk), ``float32``, or ``float64`` rows (exact references).
        curvature: fit the projected K-FAC factors in the same pass.
        dtype: precision of the computation (and of the parts on disk while building).
        stages: where to build: ``fit`` (from the training backward) and/or ``predict`` (a pass of its own).
        weighting: in ``fit``, multiply each step's rows by that step's learning rate (``learning_rate``, of
            the parameter group of each layer's weight) or not (``none``: plain sums over the visits).
        normalisation: in ``fit``, ``adam`` divides each gradient by Adam's ``sqrt(v̂) + ε`` of its step.
        epochs: in ``fit``, the epochs that collect (``null``: every epoch).
        every_n_steps: in ``fit``, collect on the optimizer steps divisible by n only (1: every step). A
            sample: an example's row sums only its collected visits, and examples never collected get no row.
        train_loss_reduction: how ``training_step`` reduces its loss (``auto`` checks it on the first batch;
            see :class:`~lit_attrib.engine.TrainLossScale`).
        check_train_loss: re-run ``training_step`` once on the first batch to check the reduction.
        part_rows: rows per part file written while building (a killed build loses at most the rows since
            its last part); default about 256 MB of rows.
        resume: in ``predict``, continue a killed build of the same arguments and weights in ``output_dir``
            (its finished parts are kept, their examples are not computed again). ``fit`` resumes from a
            checkpoint (``ckpt_path``) instead: the callback's state says which parts were written by then.
        dtype: precision of the computation.
        loss_fn: each example's summed loss (shortcut for ``task=Task(loss_fn=...)``).
        task: what lit_attrib needs to know about the module's batches and loss.
        output_dir: the index folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name.
        overwrite: replace an index (or an unfinished build) made with other arguments.

    Raises:
        ConfigError: invalid arguments, ``normalisation: adam`` where it cannot be exact (another optimizer,
            gradient accumulation, ``curvature``, ``predict``), a shuffled loader without example ids.
        ArtifactError: ``output_dir`` holds an index or build of other arguments (or, resuming, other weights).

    Example::

        trainer = Trainer(callbacks=[GradientIndexCallback(target_modules=["*.mlp.*_proj"], stages=["fit"])])
        trainer.fit(module, datamodule=data)          # the index is written when training ends
        GradientIndex(f"{trainer.log_dir}/index").topk(query_rows, k=10)
    """

    metadata_file = METADATA_FILE

    def __init__(
        self,
        target_modules: list[str] | None = None,
        projection_dim: int | None = 64,
        seed: int = 0,
        storage_dtype: Literal["float16", "float32", "float64"] = "float16",
        curvature: bool = True,
        dtype: Literal["float32", "float64"] = "float32",
        stages: list[Literal["fit", "predict"]] | None = None,
        weighting: Literal["learning_rate", "none"] = "learning_rate",
        normalisation: Literal["none", "adam"] = "none",
        epochs: list[int] | None = None,
        every_n_steps: int = 1,
        train_loss_reduction: Literal["auto", "sum", "example_mean", "token_mean"] = "auto",
        check_train_loss: bool = True,
        part_rows: int | None = None,
        resume: bool = False,
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
        stages = list(stages or ["fit", "predict"])
        if unknown := [s for s in stages if s not in ("fit", "predict")]:
            problems.append(f"stages must be among fit, predict; got {unknown}")
        if weighting not in ("learning_rate", "none"):
            problems.append(f"weighting must be learning_rate or none; got {weighting!r}")
        if normalisation not in ("none", "adam"):
            problems.append(f"normalisation must be none or adam; got {normalisation!r}")
        if normalisation == "adam" and curvature:
            problems.append("normalisation: adam stores Adam-preconditioned gradients, which the projected K-FAC "
                            "curvature does not describe; set curvature: false (query with curvature='identity')")
        if normalisation == "adam" and "fit" not in stages:
            problems.append("normalisation: adam needs the optimizer's second moment, which only fit has; add fit "
                            "to stages")
        if every_n_steps < 1:
            problems.append(f"every_n_steps must be at least 1; got {every_n_steps}")
        if epochs is not None and (not epochs or min(epochs) < 0):
            problems.append(f"epochs must be a non-empty list of epoch numbers ≥ 0 (or null for every epoch); got {epochs}")
        if part_rows is not None and part_rows < 1:
            problems.append(f"part_rows must be at least 1 (or null for about 256 MB per part); got {part_rows}")
        if problems:
            raise ConfigError("invalid GradientIndexCallback arguments:\n  - " + "\n  - ".join(problems))
        self.target_modules = list(target_modules or ["*.mlp.*_proj"])
        self.projection_dim = projection_dim
        self.seed = seed
        self.storage_dtype = storage_dtype
        self.curvature = curvature
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.stages = stages
        self.weighting = weighting
        self.normalisation = normalisation
        self.epochs = None if epochs is None else sorted(set(epochs))
        self.every_n_steps = every_n_steps
        self.train_loss_reduction = train_loss_reduction
        self.check_train_loss = check_train_loss
        self.part_rows = part_rows
        self.resume = resume
        self.loss_fn = loss_fn
        self.task = task
        self.output_dir = output_dir
        self.name = name
        self.overwrite = overwrite
        self._stage: str | None = None
        self._accumulator: ProjectedGradients | None = None
        self._tracker: LayerTracker | None = None
        self._pending_state: dict | None = None
        self._finished = False

    @override
    def arguments(self) -> dict:
        return {"target_modules": self.target_modules, "projection_dim": self.projection_dim, "seed": self.seed,
                "storage_dtype": self.storage_dtype, "curvature": self.curvature,
                "dtype": str(self.dtype).replace("torch.", ""), "weighting": self.weighting,
                "normalisation": self.normalisation, "epochs": self.epochs, "every_n_steps": self.every_n_steps,
                "loss_fn": function_name(self.loss_fn)}

    def _json_arguments(self) -> dict:
        return _as_json(self.arguments())

    @property
    def _owner(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    # ----------------------------------------------------------------------------- set-up
    def _setup(self, trainer: Trainer, pl_module: LightningModule, stage: str, needs: tuple[str, ...]) -> None:
        self._stage = stage
        self._task = resolve_task(pl_module, self.task, self.loss_fn, owner=self._owner, needs=needs)
        self._layers = find_layers(pl_module, self.target_modules)
        k = self.projection_dim
        sizes = {name: (layer.gradient_shape[0] if k is None else min(k, layer.gradient_shape[0]),
                        layer.gradient_shape[1] if k is None else min(k, layer.gradient_shape[1]))
                 for name, layer in self._layers.items()}
        self._accumulator = ProjectedGradients(self._layers, sizes, self.seed, self.dtype, pl_module.device,
                                               curvature=self.curvature)
        self._tracker = LayerTracker(self._layers, on_gradient=self._on_gradient)
        self._tracker.active = False
        width = self._accumulator.width
        self._stored_dtype = storage_tensor_dtype(_STORAGE[self.storage_dtype])
        kept = self._stored_dtype if stage == "predict" else self.dtype
        self._part_rows = self.part_rows or max(1, _PART_BYTES // (width * kept.itemsize))
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._kept_sums: dict[str, torch.Tensor] = {}
        self._uses: list[tuple[LayerInfo, torch.Tensor, torch.Tensor]] = []
        self._finished = False
        rank_zero_info(f"{self._owner}: {len(self._layers)} layer(s), rows of {width} {self.storage_dtype} values "
                       f"per example, built in {stage}")

    def _prepare_folder(self, trainer: Trainer, keep: set[str] | None, weights: str | None) -> None:
        """A fresh build (``keep is None``) removes an earlier index and any unfinished build; a resumed one
        keeps the parts ``keep`` and removes the others (written after the checkpoint it resumes from)."""
        folder = self.folder(trainer)
        self.check_overwrite(trainer)
        progress = read_progress(folder)
        arguments = _as_json(self.arguments())
        if progress is not None and progress.get("arguments") != arguments and not self.overwrite:
            differing = sorted(k for k in set(progress["arguments"]) | set(arguments)
                               if progress["arguments"].get(k) != arguments.get(k))
            raise ArtifactError(f"'{folder}' holds an unfinished gradient index built with other arguments "
                                f"({', '.join(differing)} differ); choose another output_dir or name, or set "
                                f"overwrite=True to replace it")
        if trainer.is_global_zero:
            (folder / METADATA_FILE).unlink(missing_ok=True)  # shards are about to change: nothing vouches for them
            if keep is None:
                remove_build_files(folder)
            else:
                remove_build_files(folder, [name for name in list_parts(folder) if name not in keep])
            write_progress(folder, {"arguments": arguments, "stage": self._stage, "weights": weights})
        trainer.strategy.barrier()
        mine = [sequence for rank, sequence in list_parts(folder).values() if rank == trainer.global_rank]
        self._sequence = max(mine, default=-1) + 1

    # ----------------------------------------------------------------------------- predict
    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "predict" not in self.stages:
            return
        if self.normalisation == "adam":
            raise ConfigError(f"{self._owner}: normalisation: adam needs the optimizer's second moment, which a "
                              f"predict pass does not have; set normalisation: none here, or build the index in fit")
        require_one_loader(trainer, self._owner)
        self._setup(trainer, pl_module, "predict", needs=("loss",))
        self._example_ids = ExampleIds(self._task, self._owner)
        self._context = context_length(pl_module)
        weights = tensors_checksum(pl_module.parameters())  # every weight upstream shapes the rows
        self._done = None
        folder = self.folder(trainer)
        progress = read_progress(folder) if self.resume else None
        if (progress is not None and progress.get("stage") == "predict" and list_parts(folder)
                and progress.get("arguments") == _as_json(self.arguments())):
            if progress.get("weights") != weights:
                raise ArtifactError(f"{self._owner}: the unfinished index in '{folder}' was built from other weights; "
                                    f"resume with the same checkpoint, or set resume: false to build afresh")
            self._prepare_folder(trainer, set(list_parts(folder)), weights)
            done = [part_ids(folder, name) for name in list_parts(folder)]
            self._done = np.unique(np.concatenate(done))
            rank_zero_info(f"{self._owner}: resuming: {len(self._done)} example(s) already indexed in {folder}")
        else:
            if self.resume:
                rank_zero_info(f"{self._owner}: nothing to resume in {folder}; building afresh")
            self._prepare_folder(trainer, None, weights)
        self._tracker.attach()

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._stage != "predict" or self._accumulator is None:
            return
        if batch_idx == 0:
            self._example_ids.check(current_loader(trainer, dataloader_idx), batch, trainer, "the indexed examples",
                                    sharded=True)
        ids = self._example_ids(batch)
        check_context(self._task, batch, self._context, "an example")
        mask, keep = self._task.padding_mask(batch), None
        if self._done is not None:
            new = torch.from_numpy(~np.isin(ids.numpy(), self._done))
            if not bool(new.any()):
                return  # indexed before the build was killed
            if not bool(new.all()):
                keep = new
                mask = self._keep_tokens(batch, mask, new)
        self._accumulator.begin_batch(len(ids), mask)
        losses = own_backward(trainer, pl_module, self._tracker, self._task, batch)
        rows = self._accumulator.end_batch()
        if not (bool(torch.isfinite(losses).all()) and bool(torch.isfinite(rows).all())):
            raise TrainingError(f"{self._owner}: non-finite gradients for rows {ids.tolist()[:8]}")
        if keep is not None:
            rows, ids = rows[keep.to(rows.device)], ids[keep]
        self._keep_batch(trainer, rows, ids)

    def _keep_tokens(self, batch: Any, mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        """The curvature's token mask restricted to the examples ``keep`` (a batch partly indexed already)."""
        if mask is None:
            ids = self._task.input_ids(batch)
            if ids is None:
                raise ArtifactError(f"{self._owner}: a batch is partly indexed already (the loader's batches differ "
                                    f"from the killed build's) and its tokens cannot be told apart for the curvature; "
                                    f"resume with the same batch size and processes, or build afresh")
            mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
        return mask.bool() & keep.to(mask.device)[:, None]

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "predict" and self._accumulator is not None:
            self._finish(trainer, {"stage": "predict", "weighting": "none", "normalisation": "none"})

    # ---------------------------------------------------------------------------- the store
    def _keep_batch(self, trainer: Trainer, rows: torch.Tensor, ids: torch.Tensor) -> None:
        for key, value in self._accumulator.take_sums().items():
            self._kept_sums[key] = value if key not in self._kept_sums else self._kept_sums[key] + value
        if self._stage == "predict":  # never summed: kept (and written) as they will be stored
            rows = rows.to(self._stored_dtype)
        self._buffer.append((rows.detach().cpu(), ids.cpu()))
        self._buffered += len(ids)
        if self._buffered >= self._part_rows:
            self._flush(trainer)

    def _take_buffer(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The rows, ids and curvature sums kept since the last part; the buffer is emptied."""
        rows = torch.cat([rows for rows, _ in self._buffer])
        ids = torch.cat([ids for _, ids in self._buffer])
        sums = self._kept_sums
        self._buffer, self._buffered, self._kept_sums = [], 0, {}
        return rows, ids, sums

    def _flush(self, trainer: Trainer) -> None:
        """Write the rows kept since the last part, with their curvature sums, as one atomic part."""
        if not self._buffer:
            return
        rows, ids, sums = self._take_buffer()
        write_part(self.folder(trainer), trainer.global_rank, self._sequence, rows, ids, sums)
        self._sequence += 1

    def _finish(self, trainer: Trainer, collection: dict) -> None:
        """Merge every process's parts into one shard per process, then (rank zero) the curvature and
        ``index.json``, last; the parts go. A one-process predict build that never wrote a part writes its
        shard straight from memory."""
        self._tracker.detach()
        folder = self.folder(trainer)
        if self._stage == "predict" and trainer.world_size == 1 and self._sequence == 0 and self._buffer:
            rows, ids, sums = self._take_buffer()
            rows = write_shard(folder, 0, rows, ids.numpy(), _STORAGE[self.storage_dtype])
            names = []
        else:
            self._flush(trainer)
            trainer.strategy.barrier()
            names = list(list_parts(folder))
            merge_parts(folder, names, trainer.global_rank, trainer.world_size, self._accumulator.width,
                        _STORAGE[self.storage_dtype], duplicates="sum" if self._stage == "fit" else "refuse")
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                rows, sums = sum(len(part_ids(folder, name)) for name in names), part_sums(folder, names)
        if trainer.is_global_zero:
            tensors = self._curvature(sums) if self.curvature else {}
            if tensors:
                write_curvature(folder, tensors)
            write_metadata(folder, {
                "name": self.name,
                "arguments": _as_json(self.arguments()),
                "collection": {**collection, "rows_added": rows},
                "layers": {name: {**layer.describe(), "gradient_shape": list(layer.gradient_shape),
                                  "k_out": self._accumulator.sizes[name][0], "k_in": self._accumulator.sizes[name][1]}
                           for name, layer in self._layers.items()},
                "seed": self.seed,
                "width": self._accumulator.width,
                "storage_dtype": self.storage_dtype,
                "shards": [shard_names(r) for r in range(trainer.world_size)],
                "weights": layers_checksum(self._layers),
                "global_step": trainer.global_step,
                "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
            })
            remove_build_files(folder)
            rank_zero_info(f"{self._owner}: index of the rows of {rows} visit(s) written to {Path(folder)}")
        trainer.strategy.barrier()
        self._finished = True
        self._stage = None

    def _curvature(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eigendecompositions of ``A_p = Σ (P a)(P a)ᵀ / tokens`` and ``G_p`` per layer (float64)."""
        tensors = {}
        for name in self._layers:
            if f"{name}.activation" not in sums:
                continue
            tokens = max(int(sums[f"{name}.tokens"]), 1)
            for side in ("activation", "gradient"):
                values, vectors = eigendecompose(sums[f"{name}.{side}"].double() / tokens)
                tensors[f"{name}.{side}_eigenvalues"] = values
                tensors[f"{name}.{side}_eigenvectors"] = vectors
        return tensors

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer_of_state = trainer

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._tracker is not None:
            self._tracker.detach()
        self._stage = None


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons with stored arguments."""
    return json.loads(json.dumps(value))
