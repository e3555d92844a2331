"""SketchedGradCallback: step-decomposed influence (SDI) and TracIn from sketched per-example gradients (seed 001).

``TracIn(z_i, z'_j) = Σ_c η_c ⟨∇L(z_i; θ_c), ∇L(z'_j; θ_c)⟩``. A module used at steps ``s = 1..S`` of
one forward (the iterations of a looped, weight-tied block) has ``∇ = Σ_s ∇^{(s)}``, and
``SDI[i, j, s] = Σ_c η_c ⟨∇L(z_i), ∇^{(s)}L(z'_j)⟩``: the query's gradient is split by step, so SDI
summed over ``s`` is TracIn. Gradients are never materialised: each use's activations ``a`` and output
gradients ``g`` are sketched during the backward pass (TensorSketch of ``Σ_t g_t a_tᵀ`` for linear
and embedding weights, CountSketch of the per-example gradient for other, 1-D parameters), all into
one ``m``-dimensional vector per example (independent hash tables per parameter block, so cross
terms vanish in expectation). ``exact: true`` keeps the full per-example gradients instead (the
small-model reference).

Steps: every tracked module must be called the same number of times ``S`` per forward, except
modules called once (an embedding before the loop, a norm and readout after it): those get a
``prelude`` step when called before the looped modules' first call and a ``readout`` step when
called after their last; one called inside the loop, or any other count, is an error.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.scores import ChunkStore, save_tensors
from lit_attrib.artifacts.sdi import FORMAT, save_sdi, step_shares
from lit_attrib.callbacks._common import (
    DTYPES,
    ArtifactCallback,
    check_context,
    context_length,
    show_progress,
    tensors_checksum,
)
from lit_attrib.callbacks._scoring import tensorboard_text
from lit_attrib.callbacks.influence import _source_name
from lit_attrib.engine.data import (
    DataSource,
    ExampleIds,
    example_checksums,
    iterate_batches,
    resolve_loader,
)
from lit_attrib.engine.gradient_pass import TrainLossScale, own_backward
from lit_attrib.engine.task import LossFn, Task, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_parameter_modules
from lit_attrib.errors import ArtifactError, ConfigError, DataError, ModelError, TrainingError
from lit_attrib.io import atomic_path, load_checkpoint, load_state_checked, write_json
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.step_features import GradientFeatures, per_example_module, step_layout

__all__ = ["SketchedGradCallback"]

def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


class SketchedGradCallback(ArtifactCallback):
    """Step-decomposed influence and TracIn of each training example on each query.

    Two modes:

    - **checkpoint mode** (``checkpoints`` given; runs in ``lit-attrib predict``, TracInCP): for each
      checkpoint, its weights are loaded, the queries (``queries``) are sketched per
      step, and the training examples (``train_data``, by default the ``predict`` pass's) are sketched once
      and weighted by ``η_c`` (``eta``, or the learning rate stored in the checkpoint). Training
      sketches are cached on disk per checkpoint, so a killed pass resumes and a second query set
      needs no forward or backward of the training set (its batches are still read, to check the
      cached examples are unchanged). The model's own weights are restored afterwards.
    - **online mode** (no ``checkpoints``; runs in ``lit-attrib fit``, TracIn-ideal): the real
      training backward gives each batch's sketches for free (rescaled from the training loss's
      reduction to each example's summed loss); the queries are sketched every ``every_n_steps``
      optimizer steps with the current weights, and each batch adds ``lr · ⟨train, query⟩``.

    Writes ``sdi.safetensors`` (``sdi (N_train, N_query, S)`` in ``sdi`` mode, ``tracin (N_train,
    N_query)``, ``train_indices``, ``query_indices``), ``topk.jsonl`` (each query's most helpful and
    harmful training examples with their step trajectory), ``trajectories.png`` (also in
    TensorBoard) and ``sdi.json`` (steps, checkpoints and η, how the parameters share the sketch),
    written last. Rows and columns are in dataset index order; results do not depend on batching,
    shuffling or the number of processes. **Positive = the training example lowers the query's
    loss (helpful).**

    Args:
        target_modules: fnmatch patterns of modules (a container selects every module in it);
            default the whole model.
        sketch_dim: ``m``, the sketch dimension of all tracked parameters together.
        sketch_sharing: how the modules share the ``m`` coordinates. With ``shared`` every module is
            sketched into all of them (with its own hash tables), so the accuracy follows where the
            gradients are large; with ``split`` module ``b`` gets ``m_b ∝`` its parameter count of them
            (smaller FFTs, so cheaper for wide layers; ``sdi.json`` lists each module's coordinates).
        mode: ``sdi`` (per step) or ``tracin`` (summed over steps only; cheaper).
        exact: keep full per-example gradients instead of sketches (small models; the reference).
        checkpoints: checkpoint files or glob patterns (checkpoint mode); ``null`` for online mode.
        eta: checkpoint weights ``η_c``: one number for all, one per checkpoint, or ``null`` for
            the learning rate each checkpoint's optimizer state holds.
        trust_checkpoints: unpickle checkpoints that hold more than tensors and plain containers
            (``torch.load(weights_only=False)``, which runs code stored in the file); only for files you trust.
        queries: the queries: a datamodule loader's name (``<queries>_dataloader()``), a
            ``DataLoader``, a dataset, or a json/jsonl file.
        train_data: checkpoint mode: the training examples to score, the same kinds as ``queries``;
            default ``predict``, the datamodule's ``predict_dataloader()``.
        every_n_steps: online mode: sketch the queries again every this many optimizer steps.
        seed: seed of the hash and sign tables (identical on every device).
        strict: refuse parameters without a dedicated sketch (anything but linear, embedding and
            norm layers); ``false`` sketches their per-example gradients taken through torch.func.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]``, each example's summed loss (shortcut for
            ``task=Task(loss_fn=...)``); not needed for lit_attrib's modules and wrapped Hugging Face models.
        task: what lit_attrib needs to know about the module's batches and loss
            (:class:`lit_attrib.engine.Task`): the loss, example ids, token masks.
        train_loss_reduction: online mode: how the training step reduced its loss: ``sum``,
            ``example_mean``, ``token_mean`` or ``auto`` (``pl_module.loss_reduction``, else found by
            comparing ``training_step``'s loss with the summed losses on the first batch; a stated
            reduction is checked the same way).
        dtype: precision of the sketches and scores.
        top_k: helpful and harmful training examples listed per query.
        output_dir: artifact folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name (folder and TensorBoard tag).
        chunk_size: training examples per cached sketch file.
        keep_sketches: keep the cached training sketches after the pass (for other query sets).
            Exact mode caches nothing (full gradients are large; it is the small-model reference).
        plots: draw ``trajectories.png`` (and its TensorBoard figure).
        overwrite: replace results in ``output_dir`` that were made with other arguments.
    """

    metadata_file = "sdi.json"

    def __init__(
        self,
        target_modules: list[str] | None = None,
        sketch_dim: int = 1024,
        sketch_sharing: Literal["shared", "split"] = "shared",
        mode: Literal["sdi", "tracin"] = "sdi",
        exact: bool = False,
        checkpoints: list[str] | str | None = None,
        eta: float | list[float] | None = None,
        trust_checkpoints: bool = False,
        queries: DataSource = "query",
        train_data: DataSource = "predict",
        every_n_steps: int = 1,
        seed: int = 0,
        strict: bool = True,
        loss_fn: LossFn | None = None,
        task: Task | None = None,
        train_loss_reduction: Literal["auto", "sum", "example_mean", "token_mean"] = "auto",
        dtype: str = "float32",
        top_k: int = 10,
        output_dir: str | None = None,
        name: str = "sdi",
        chunk_size: int = 1024,
        keep_sketches: bool = True,
        plots: bool = True,
        overwrite: bool = False,
    ) -> None:
        problems = []
        if not isinstance(sketch_dim, int) or sketch_dim < 1:
            problems.append(f"sketch_dim must be an integer of at least 1; got {sketch_dim!r}")
        if sketch_sharing not in ("shared", "split"):
            problems.append(f"sketch_sharing must be 'shared' or 'split'; got {sketch_sharing!r}")
        if mode not in ("sdi", "tracin"):
            problems.append(f"mode must be 'sdi' or 'tracin'; got {mode!r}")
        if every_n_steps < 1:
            problems.append(f"every_n_steps must be at least 1; got {every_n_steps}")
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {list(DTYPES)}; got '{dtype}'")
        if chunk_size < 1:
            problems.append(f"chunk_size must be at least 1; got {chunk_size}")
        if top_k < 0:
            problems.append(f"top_k must be non-negative; got {top_k}")
        if isinstance(checkpoints, str):
            checkpoints = [checkpoints]
        if checkpoints is not None and not checkpoints:
            problems.append("checkpoints is empty; give checkpoint files or globs, or null for online mode in fit")
        if problems:
            raise ConfigError(f"invalid {type(self).__name__} arguments:\n  - " + "\n  - ".join(problems))
        self.target_modules = target_modules
        self.sketch_dim = sketch_dim
        self.sketch_sharing = sketch_sharing
        self.mode = mode
        self.exact = exact
        self.checkpoints = checkpoints
        self.eta = eta
        self.trust_checkpoints = trust_checkpoints
        self.queries = queries
        self.train_data = train_data
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.strict = strict
        self.loss_fn = loss_fn
        self.task = task
        self._task: Task | None = None
        self._ids: ExampleIds | None = None
        self._train_scale: TrainLossScale | None = None
        self.train_loss_reduction = train_loss_reduction
        self.dtype = DTYPES[dtype]
        self.top_k = top_k
        self.output_dir = output_dir
        self.name = name
        self.chunk_size = chunk_size
        self.keep_sketches = keep_sketches
        self.plots = plots
        self.overwrite = overwrite
        self.layers: dict[str, LayerInfo] = {}
        self.step_names: list[str] | None = None
        self._steps: dict[str, list[int]] | None = None
        self._tracker: LayerTracker | None = None
        self._features: GradientFeatures | None = None
        self._collect = None
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._queries: torch.Tensor | None = None
        self._query_indices: torch.Tensor | None = None
        self._used: list[dict] = []
        self._online = False
        self._refreshed_at = -1
        self._lr = 0.0
        self._scale = 1.0
        self._train_features: dict[str, list] = {}
        self._context: int | None = None
        self._original: dict[str, torch.Tensor] | None = None
        self._layout_checked = False
        self._batch_size = 0
        self._batch_ids: torch.Tensor | None = None

    @override
    def arguments(self) -> dict:
        return {"target_modules": self.target_modules, "sketch_dim": self.sketch_dim,
                "sketch_sharing": self.sketch_sharing, "mode": self.mode,
                "exact": self.exact, "checkpoints": self.checkpoints, "eta": self.eta,
                "queries": _source_name(self.queries), "train_data": _source_name(self.train_data),
                "every_n_steps": self.every_n_steps, "seed": self.seed, "strict": self.strict,
                "dtype": str(self.dtype).replace("torch.", ""),
                "loss_fn": None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))}

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
        self._records = []
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
            raise DataError(f"the queries are empty: {_source_name(self.queries)} gave no examples")
        indices = torch.cat(indices)
        order = torch.argsort(indices)
        if len(indices.unique()) != len(indices):
            raise DataError(f"the queries ({_source_name(self.queries)}) repeat example ids; each query needs its own")
        return torch.cat(parts)[order.to(parts[0].device)], indices[order]

    def _contract(self, train: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight · ⟨train_i, query_{j,s}⟩``: ``(B, N_q, S')``."""
        queries = self._queries
        flat = queries.flatten(0, 1)  # (N_q·S', size)
        return (weight * (train.to(flat.dtype) @ flat.T)).view(train.shape[0], queries.shape[0], queries.shape[1])

    def _record(self, indices: torch.Tensor, rows: torch.Tensor) -> None:
        self._records.append((indices.cpu(), rows.detach().cpu()))
        if len(self._records) >= 256:
            self._records = [self._reduced()]

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The records summed by dataset index: ``(indices, rows)`` in index order."""
        if not self._records:
            width = self._queries.shape[:2] if self._queries is not None else (0, 1)
            return torch.empty(0, dtype=torch.long), torch.empty(0, *width, dtype=self.dtype)
        indices = torch.cat([r[0] for r in self._records])
        rows = torch.cat([r[1] for r in self._records])
        unique, inverse = torch.unique(indices, return_inverse=True)
        return unique, rows.new_zeros(len(unique), *rows.shape[1:]).index_add_(0, inverse, rows)

    # ---------------------------------------------------------------------- checkpoint mode
    def _resolve_checkpoints(self) -> list[str]:
        paths = []
        for entry in self.checkpoints:
            matches = sorted(glob.glob(entry), key=_natural) if glob.has_magic(entry) else [entry]
            if not matches or not Path(matches[0]).is_file():
                raise ArtifactError(f"no checkpoint at '{entry}'; train first (e.g. lit-attrib fit -c "
                                    f"configs/looped_addition.yaml writes runs/looped_addition/checkpoints) or fix "
                                    f"the path")
            paths.extend(matches)
        if isinstance(self.eta, list) and len(self.eta) != len(paths):
            raise ConfigError(f"eta has {len(self.eta)} values for the {len(paths)} checkpoints {paths[:4]}…; give "
                             f"one per checkpoint, one number for all, or null for their learning rates")
        return paths

    def _load_checkpoint(self, pl_module: LightningModule, path: str, position: int) -> dict:
        checkpoint = load_checkpoint(path, trust_pickle=self.trust_checkpoints,
                                     opt_in=f"set {type(self).__name__}'s trust_checkpoints: true")
        load_state_checked(pl_module, checkpoint, path)
        if isinstance(self.eta, list):
            eta = float(self.eta[position])
        elif self.eta is not None:
            eta = float(self.eta)
        else:
            try:
                eta = float(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])
            except (KeyError, IndexError, TypeError):
                raise ArtifactError(f"checkpoint '{path}' holds no optimizer learning rate to weight it by; give eta "
                                    f"(one number or one per checkpoint)") from None
        return {"path": str(path), "eta": eta, "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch")}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.checkpoints is None:
            rank_zero_warn(f"{type(self).__name__}[{self.name}] has no checkpoints: it works online, during fit; in "
                           f"predict it does nothing. Give checkpoints for TracInCP")
            return
        paths = self._resolve_checkpoints()
        if not self.trust_checkpoints:  # refuse a file that needs unpickling before any pass, not at its turn
            for path in paths:
                if torch.serialization.get_unsafe_globals_in_checkpoint(path):
                    load_checkpoint(path, opt_in=f"set {type(self).__name__}'s trust_checkpoints: true")  # raises
        self._setup(trainer, pl_module)
        self._original = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._used = []
        try:
            for position, path in enumerate(tqdm(paths, desc=f"{self.name}: checkpoints",
                                                 disable=not show_progress(trainer) or len(paths) == 1)):
                self._used.append(self._load_checkpoint(pl_module, path, position))
                self._checkpoint_pass(trainer, pl_module, self._used[-1])
        finally:
            pl_module.load_state_dict(self._original)
            self._original = None
        self._finish(trainer, pl_module)

    def _checkpoint_pass(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        pl_module.eval()
        self._queries, self._query_indices = self._query_features(trainer, pl_module)
        fingerprint = {"arguments": {k: v for k, v in self.arguments().items()
                                     if k not in ("mode", "queries", "checkpoints", "eta", "every_n_steps")},
                       "modules": list(self.layers), "weights": tensors_checksum(pl_module.state_dict().values()),
                       "steps": self.step_names}
        store = None if self.exact else ChunkStore(  # exact gradients are not cached: they can be huge
            self.folder(trainer), f"{self.name}-sketches-{fingerprint['weights']}", fingerprint, trainer.global_rank,
            self.chunk_size)
        if store is not None and (reason := store.prepare(trainer.is_global_zero)):
            rank_zero_warn(f"{type(self).__name__}[{self.name}]: discarded cached sketches because {reason}")
        trainer.strategy.barrier()
        cached: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        for file in store.files() if store is not None else []:
            part = load_file(str(file))
            for row, (index, checksum) in enumerate(zip(part["index"].tolist(), part["checksum"].tolist())):
                cached[(index, checksum)] = (part["sketch"], row)
        loader = resolve_loader(self.train_data, trainer, pl_module, "the training examples")
        ids = ExampleIds(self._task, f"{type(self).__name__}[{self.name}]")
        count = reused = 0
        for position, batch in enumerate(tqdm(loader, desc=f"{self.name}: training set", leave=False,
                                              disable=not show_progress(trainer))):
            if position == 0:
                ids.check(loader, batch, trainer, "the training examples", sharded=True)
            indices = ids(batch)  # every batch is numbered, also those another process scores
            if position % trainer.world_size != trainer.global_rank:
                continue
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            count += len(indices)
            checksums = example_checksums(self._task, batch)
            keys = list(zip(indices.tolist(), checksums.tolist()))
            if all(key in cached for key in keys):
                train = torch.stack([cached[key][0][cached[key][1]] for key in keys]).to(pl_module.device)
                reused += len(keys)
            else:
                check_context(self._task, batch, self._context, "a training example")
                train = self._example_features(trainer, pl_module, batch, per_step=False)
                if store is not None:
                    store.add(indices, {"sketch": train, "checksum": checksums})
            self._record(indices, self._contract(train, checkpoint["eta"]))
        if store is not None:
            store.flush()
        trainer.strategy.barrier()
        if store is not None and not self.keep_sketches and trainer.is_global_zero:
            store.remove()
        reused = trainer.strategy.reduce(torch.tensor(float(reused), device=pl_module.device), reduce_op="sum")
        checkpoint["reused_examples"] = int(reused)

    # ------------------------------------------------------------------------- online mode
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._online = self.checkpoints is None
        if not self._online:
            return
        restored = self._records
        self._setup(trainer, pl_module)
        self._records = restored
        self._refreshed_at = -1
        self._train_scale = TrainLossScale(self.train_loss_reduction, self._task, f"{type(self).__name__}[{self.name}]")
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
        if step % self.every_n_steps == 0 and self._refreshed_at != step:
            self._queries, self._query_indices = self._query_features(trainer, pl_module)
            self._refreshed_at = step
        if batch_idx == 0:
            self._ids.check(trainer.train_dataloader, batch, trainer, "the training set")
        self._batch_ids = self._ids(batch)
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._scale = self._train_scale.for_batch(trainer, pl_module, batch, batch_idx)
        self._train_features = {}

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
        self._record(self._batch_ids, self._contract(train, self._lr))


    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._online:
            return
        self._online = False
        self._finish(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self._online or not self._records:
            return {}
        indices, rows = self._reduced()
        return {"indices": indices, "rows": rows, "steps": self.step_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._records = [(state_dict["indices"], state_dict["rows"])]

    # ------------------------------------------------------------------------- the artifact
    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sum every process's rows by index on rank zero and write the artifact."""
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        indices, rows = self._reduced()
        part = folder / f".{self.name}-part-rank{trainer.global_rank:03d}.safetensors"
        save_tensors(part, {"index": indices, "rows": rows}, FORMAT)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [load_file(str(folder / f".{self.name}-part-rank{r:03d}.safetensors"))
                     for r in range(trainer.world_size)]
            all_indices = torch.cat([p["index"] for p in parts])
            unique, inverse = torch.unique(all_indices, return_inverse=True)
            all_rows = torch.cat([p["rows"] for p in parts])
            sdi = all_rows.new_zeros(len(unique), *all_rows.shape[1:]).index_add_(0, inverse, all_rows)
            (folder / "sdi.json").unlink(missing_ok=True)  # the old metadata must not vouch for new tensors
            self._write(trainer, folder, unique, sdi)
        trainer.strategy.barrier()
        (folder / f".{self.name}-part-rank{trainer.global_rank:03d}.safetensors").unlink(missing_ok=True)
        self._records = []
        self._queries = None  # the query sketches can be large; the indices stay for the artifact
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
        if self._tracker is not None:
            self._tracker.detach()
        self._online = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._tracker is not None:
            self._tracker.detach()
