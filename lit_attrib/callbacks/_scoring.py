"""The skeleton the influence callbacks share: saved factors, layer selection, gradient passes through
the tracked layers, and a resumable, index-ordered score pass over ``predict``'s batches."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.factors import PRECONDITIONING_KEYS, Factors, load_factors
from lit_attrib.artifacts.scores import ChunkStore
from lit_attrib.callbacks._common import (
    DTYPES,
    ArtifactCallback,
    check_context,
    context_length,
    decode_texts,
    layers_checksum,
    show_progress,
)
from lit_attrib.engine.data import (
    DataSource,
    ExampleIds,
    current_loader,
    iterate_batches,
    require_one_loader,
    resolve_loader,
    source_name,
)
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import LossFn, Task, function_name, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ArtifactError, ConfigError, DataError, TrainingError
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.gradients import ExampleGradients
from lit_attrib.ops.kfac import TokenGradients


class FactorScoringCallback(ArtifactCallback, ABC):
    """Base of :class:`InfluenceCallback` and :class:`TokenInfluenceCallback` (not used directly).

    Subclasses implement :meth:`prepare` (gradients computed once when ``predict`` starts),
    :meth:`score_batch` (a batch's scores, as tensors with the example on the first axis) and
    :meth:`write` (the artifact, on rank zero, from the assembled chunks).
    """

    tensors_file = "scores.safetensors"
    metadata_file = "scores.json"
    needs_texts = True

    needs: tuple[str, ...] = ("loss",)

    def __init__(self, factors: str, target_modules: list[str] | None, damping: float | None, dtype: str,
                 loss_fn: LossFn | None, output_dir: str | None, name: str, chunk_size: int, overwrite: bool,
                 task: Task | None = None, token_loss_fn: LossFn | None = None) -> None:
        problems = []
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {list(DTYPES)}; got '{dtype}'")
        if chunk_size < 1:
            problems.append(f"chunk_size must be at least 1; got {chunk_size}")
        if damping is not None and damping < 0:
            problems.append(f"damping must be non-negative (or null for 0.1 · mean(Λ)); got {damping}")
        if problems:
            raise ConfigError(f"invalid {type(self).__name__} arguments:\n  - " + "\n  - ".join(problems))
        self.factors_path = factors
        self.target_modules = target_modules
        self.damping = damping
        self.dtype = DTYPES[dtype]
        self.loss_fn = loss_fn
        self.token_loss_fn = token_loss_fn
        self.task = task
        self._task: Task | None = None
        self._ids: ExampleIds | None = None
        self.output_dir = output_dir
        self.name = name
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        self.layers: dict[str, LayerInfo] = {}
        self.factors: Factors | None = None
        self._tracker: LayerTracker | None = None
        self._store: ChunkStore | None = None
        self._covered: set[int] = set()
        self._context: int | None = None
        self._seen = 0
        self._skipped = 0
        self._on_gradient = None

    @override
    def arguments(self) -> dict:
        return {"factors": str(self.factors_path), "target_modules": self.target_modules, "damping": self.damping,
                "dtype": str(self.dtype).replace("torch.", ""),
                "loss_fn": function_name(self.loss_fn)}

    # --------------------------------------------------------------------------- set-up
    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tracker is not None:  # hooks of an earlier pass that ended in an exception
            self._tracker.detach()
        owner = f"{type(self).__name__}[{self.name}]"
        self._task = resolve_task(pl_module, self.task, self.loss_fn, self.token_loss_fn, owner=owner, needs=self.needs)
        self._ids = ExampleIds(self._task, owner)
        require_one_loader(trainer, owner)
        folder = self.folder(trainer)
        self.check_overwrite(trainer)
        # The eigenbases and Λ only: the covariances and eigenvalues (half of the file) are not used here.
        self.factors = load_factors(self.factors_path, pl_module, device=pl_module.device, keys=PRECONDITIONING_KEYS)
        self.layers = self._select_layers(pl_module)
        self._tracker = LayerTracker(self.layers, on_gradient=self._dispatch_gradient).attach()
        self._tracker.active = False
        self._context = context_length(pl_module)
        fingerprint = self.prepare(trainer, pl_module)
        fingerprint = {"arguments": self.arguments(), "model": self._checksum(), "prepared": self._digest(),
                       "factors": hashlib.sha256(json.dumps(self.factors.metadata, sort_keys=True).encode()).hexdigest()[:16],
                       **fingerprint}
        self._store = ChunkStore(folder, self.name, fingerprint, trainer.global_rank, self.chunk_size)
        if reason := self._store.prepare(trainer.is_global_zero):
            rank_zero_warn(f"{type(self).__name__}[{self.name}]: discarded the partial results in '{folder}' "
                           f"because {reason}")
        trainer.strategy.barrier()
        self._covered = self._store.covered()
        self._seen = self._skipped = 0
        if self._covered:
            rank_zero_info(f"{type(self).__name__}[{self.name}]: resuming; {len(self._covered)} examples are "
                           f"already scored in '{self._store.folder}'")

    def _select_layers(self, pl_module: LightningModule) -> dict[str, LayerInfo]:
        saved = list(self.factors.metadata.get("modules", self.factors.modules))
        layers = find_layers(pl_module, self.target_modules or saved)
        if missing := [name for name in layers if name not in self.factors.modules]:
            raise ArtifactError(
                f"the factors in '{self.factors_path}' were not fitted for {missing[:8]}; they hold {saved[:8]}"
                f"{' …' if len(saved) > 8 else ''}. Narrow target_modules, or collect factors for these layers"
            )
        return layers

    def _digest(self) -> str:
        """A fingerprint of what :meth:`prepare` computed (query gradients or the direction): it depends on
        the model, the factors, the damping and the queries' content, all of which the chunks depend on.
        A strided sample of each tensor and its sum in its own dtype, not all its bytes (those can be
        gigabytes; a float64 copy of them took 17 s on SmolLM2's query gradients)."""
        digest = hashlib.sha256()
        for tensor in self.prepared_tensors():
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)]
            summary = torch.cat([sample.double(), flat.sum()[None].double()])
            digest.update(summary.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _checksum(self) -> str:
        """A short hash of the tracked weights: chunks of other weights must not be resumed from."""
        return layers_checksum(self.layers)

    # ------------------------------------------------------------------------ gradients
    def _dispatch_gradient(self, layer: LayerInfo, use: int, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        self._on_gradient(layer, activations, gradients)

    def backward(self, trainer: Trainer, pl_module: LightningModule, batch: Any, on_gradient) -> torch.Tensor:
        """One own forward/backward; ``on_gradient(layer, a, g)`` (an accumulator's ``add``) gets every use
        of every tracked layer."""
        self._on_gradient = on_gradient
        try:
            return own_backward(trainer, pl_module, self._tracker, self._task, batch)
        finally:
            self._on_gradient = None

    def example_gradients(self, trainer: Trainer, pl_module: LightningModule, source: DataSource, what: str,
                          per_example: Callable[[LayerInfo, TokenGradients], Any] | None = None,
                          shard: bool = False, layers: dict[str, LayerInfo] | None = None,
                          label: str | None = None) -> tuple[dict[str, Any], torch.Tensor, list[str], int]:
        """Gradients ``DW`` of each tracked layer (or of ``layers`` only) over a set of examples (see
        :data:`DataSource`); ``label`` names the set in messages (default: the source's name).

        Returns ``(gradients, indices, texts, count)``, ``count`` over every process. With ``per_example``,
        each layer's list of ``per_example(layer, DW)`` over the batches, ``DW`` being the batch's
        per-example gradients as :class:`~lit_attrib.ops.kfac.TokenGradients` (``.full()`` multiplies them
        out to ``(B, out, in)``). ``per_example`` runs as soon as a layer's last use of the batch is
        through the backward, and the gradients are dropped, so that only the layers whose uses are still
        arriving (one, in a network without weight sharing) hold per-example gradients. Otherwise each
        layer's sum over the examples ``(out, in)`` (summed across processes when ``shard`` splits the
        batches).
        """
        layers = self.layers if layers is None else layers
        accumulator = ExampleGradients(layers, self.dtype, per_example=per_example is not None,
                                       device=pl_module.device)
        parts: dict[str, list[Any]] = {name: [] for name in layers}

        def on_gradient(layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor) -> None:
            accumulator.add(layer, activations, gradients)
            if per_example is None:
                return
            if self._tracker.last_use(layer.name):  # the forward's last use is in
                parts[layer.name].append(per_example(layer, accumulator.take(layer.name)))

        indices, texts = [], []
        loader = resolve_loader(source, trainer, pl_module, f"the {what}")
        label = source_name(source) if label is None else label
        ids = ExampleIds(self._task, f"{type(self).__name__}[{self.name}]")
        batches = iterate_batches(trainer, pl_module, loader, shard=shard)
        self._tracker.enabled = set(layers)
        try:
            for batch in tqdm(batches, desc=f"{self.name}: {label} gradients", leave=False,
                              disable=not show_progress(trainer)):
                if not indices and per_example is not None:  # rows are told apart only where they are kept apart
                    ids.check(loader, batch, trainer, f"the {what}")
                check_context(self._task, batch, self._context, f"an example of the {what}")
                rows = ids(batch)
                accumulator.begin_batch(len(rows))
                losses = self.backward(trainer, pl_module, batch, on_gradient)
                if not bool(torch.isfinite(losses).all()):
                    raise TrainingError(f"{type(self).__name__}[{self.name}]: non-finite loss in the {what} "
                                        f"(rows {rows.tolist()[:8]})")
                # Layers with a use the loss did not reach (zeros where no use did), in model order.
                for name, gradients in accumulator.end_batch().items():
                    parts[name].append(per_example(layers[name], gradients))
                indices.append(rows)
                if self.needs_texts:
                    texts.extend(decode_texts(trainer, pl_module, self._task, batch))
        finally:
            self._tracker.enabled = set(self.layers)
        # A layer the loss never reached, or a rank without batches, adds zeros; several processes add up.
        accumulator.reduce((lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if shard and trainer.world_size > 1
                           else (lambda t: t))
        if accumulator.count == 0:
            raise DataError(f"the {what} are empty: {label} gave no examples; check the data that feeds it")
        gradients = parts if per_example is not None else accumulator.sums
        return (gradients, torch.cat(indices) if indices else torch.empty(0, dtype=torch.long), texts,
                accumulator.count)

    # ---------------------------------------------------------------------- the pass
    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._store is None:
            return
        if self._seen == 0:
            self._ids.check(current_loader(trainer, dataloader_idx), batch, trainer, "the predict pass", sharded=True)
        indices = self._ids(batch)
        self._seen += len(indices)
        self._store.see(indices)
        if self._covered and set(indices.tolist()) <= self._covered:
            self._skipped += len(indices)
            return
        check_context(self._task, batch, self._context, "the example")
        tensors = self.score_batch(trainer, pl_module, batch, indices)
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TrainingError(f"{type(self).__name__}[{self.name}]: non-finite {key} for dataset indices "
                                    f"{indices.tolist()[:8]}; check the model and the factors' damping")
        texts = decode_texts(trainer, pl_module, self._task, batch) if self.needs_texts else None
        if self._covered:  # rows an earlier run scored keep their chunk; only the new rows are added
            keep = torch.tensor([index not in self._covered for index in indices.tolist()])
            if not bool(keep.all()):
                indices = indices[keep]
                tensors = {key: value[keep.to(value.device)] for key, value in tensors.items()}
                texts = None if texts is None else [text for text, kept in zip(texts, keep.tolist()) if kept]
        self._store.add(indices, tensors, texts)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._store is None:
            return
        self._store.flush()
        self._store.write_seen()
        trainer.strategy.barrier()
        folder = self.folder(trainer)
        if trainer.is_global_zero:
            indices, tensors, texts = self._store.assemble()
            metadata = {
                "name": self.name,
                "arguments": self.arguments(),
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "resumed_examples": self._skipped,
                "factors": {"path": str(self.factors_path), "strategy": self.factors.metadata.get("arguments", {}).get("strategy"),
                            "global_step": self.factors.metadata.get("global_step")},
                "modules": {name: layer.describe() for name, layer in self.layers.items()},
                "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
            }
            (folder / self.metadata_file).unlink(missing_ok=True)  # the old metadata must not vouch for new tensors
            self.write(trainer, folder, indices, tensors, texts, metadata)
            self._store.remove()
        trainer.strategy.barrier()
        self._store = None
        self._tracker.detach()
        self.factors = None
        self.release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._tracker is not None:
            self._tracker.detach()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._tracker is not None:
            self._tracker.detach()
        super().teardown(trainer, pl_module, stage)

    # ----------------------------------------------------------------- for subclasses
    @abstractmethod
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Compute what every batch needs; return what the scores depend on beyond the arguments."""

    @abstractmethod
    def prepared_tensors(self) -> Iterable[torch.Tensor]:
        """What :meth:`prepare` computed, for the resume fingerprint (read one at a time: an iterator may
        reuse one buffer for several)."""

    @abstractmethod
    def release(self) -> None:
        """Drop what :meth:`prepare` computed once the pass is written (it may be large)."""

    @abstractmethod
    def score_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                    indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's scores, each tensor with the example on its first axis (``indices``: the rows'
        dataset indices)."""

    @abstractmethod
    def write(self, trainer: Trainer, folder: Path, indices: torch.Tensor, tensors: dict[str, torch.Tensor],
              texts: list[str], metadata: dict) -> None:
        """Write the artifact (rank zero) from the assembled chunks."""


def tensorboard_text(trainer: Trainer, tag: str, text: str) -> None:
    """Add markdown ``text`` to TensorBoard when the trainer logs there."""
    experiment = getattr(trainer.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_text"):
        experiment.add_text(tag, text, global_step=trainer.global_step)
        experiment.flush()


def markdown_cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")
