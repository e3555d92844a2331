"""KFACCollectorCallback: K-FAC / EKFAC curvature factors collected while Lightning runs the model.

In ``fit`` it observes the real training backward (rescaled from the training loss's reduction to
the sum-reduced loss of each example); in ``validate``/``test``/``predict`` it runs a grad-enabled
forward/backward of its own through ``loss_fn``, so frozen and evaluation models work too. The math
lives in :mod:`lit_attrib.ops.kfac`; this file decides when, where and on which rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.factors import METADATA_FILE, factors_exist, load_factors, save_factors
from lit_attrib.callbacks._common import DTYPES, show_progress
from lit_attrib.engine.data import ensure_predict_step, release_predict_step
from lit_attrib.engine.gradient_pass import TrainLossScale, clone_batch, own_backward, slice_batch
from lit_attrib.engine.memory import release_freed_memory
from lit_attrib.engine.task import LossFn, Task, function_name, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ArtifactError, ConfigError, ModelError, TrainingError
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac_accumulator import KFACAccumulator

__all__ = ["KFACCollectorCallback"]

Stage = Literal["fit", "validate", "test", "predict"]
_PHASE_KEYS = {"covariance": ("activation", "gradient"), "lambda": ("lambda",)}
MAX_EIGEN_RESIDUAL = 1e-4
"""The largest relative residual a float32 eigendecomposition may leave (see ``eigendecomposition_dtype``)."""


class KFACCollectorCallback(Callback):
    """Collect K-FAC or EKFAC factors of the selected linear layers and save them as an artifact.

    ``A = E[a aᵀ]`` and ``G = E[g gᵀ]`` over non-padding tokens (the task's ``padding_mask``), with
    ``g`` the output gradient of each example's **summed** loss; EKFAC adds a second pass over the
    data for ``Λ = E[(Q_Gᵀ DW Q_A)²]``. Passes: for each group of layers, a covariance pass, then
    (EKFAC) a lambda pass. In ``fit`` each pass is one training epoch from ``start_epoch`` on; passes
    the training does not reach run as extra loops over the training data after it ends. In the
    other stages the stage's own loop is the first pass and the rest are extra loops over the same
    data. The log says which.

    Writes ``factors.safetensors`` + ``factors.json`` (see :mod:`lit_attrib.artifacts.factors`) and
    spectrum plots (PNG and TensorBoard) on rank zero. Running sums, counts and the pass are part of
    the callback's ``state_dict``, so a ``fit`` resumed from a checkpoint ends with the same factors.

    Args:
        target_modules: fnmatch patterns over ``pl_module.named_modules()`` (``nn.Linear`` and
            GPT-2 ``Conv1D``), e.g. ``["*.mlp.*_proj"]``.
        strategy: ``ekfac`` (eigenvalue-corrected, two passes) or ``kfac`` (one pass).
        fisher: ``empirical`` (gradients of the data's labels) or ``true`` (targets sampled from the
            model's own prediction at the positions that carry a loss; needs the task's logits, known
            for lit_attrib's modules and wrapped Hugging Face models; in ``fit`` this is an extra
            forward/backward per batch).
        stages: the stages in which to collect.
        max_examples: examples per pass (all if ``None``); split evenly over processes.
        layers_per_pass: bound memory by collecting this many layers at a time (more passes).
        module_groups: explicit groups of patterns collected one group per pass (instead of
            ``layers_per_pass``).
        dtype: accumulation and storage dtype (eigendecompositions are always float64).
        output_dir: artifact folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name (folder name and TensorBoard tag prefix).
        task: what lit_attrib needs to know about the module's batches and loss
            (:class:`lit_attrib.engine.Task`); detected for lit_attrib's modules and modules wrapping a
            Hugging Face causal LM with Hugging Face-style dict batches.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]``, each example's summed loss (shortcut for
            ``task=Task(loss_fn=...)``), for the passes the callback runs itself and to check the
            training loss's reduction in ``fit``.
        train_loss_reduction: how the training step reduced its loss: ``sum``, ``example_mean``,
            ``token_mean`` (over the task's token mask), or ``auto`` (``pl_module.loss_reduction``, else
            found by comparing ``training_step``'s loss with the summed losses on the first batch).
            A stated reduction is checked the same way.
        check_train_loss: re-run ``training_step`` once without gradients, on the first training batch,
            to check (or find) the reduction (its ``self.log`` calls are muted; anything else it does,
            such as torchmetrics updates or BatchNorm statistics, happens once more); ``false`` trusts
            ``train_loss_reduction`` as stated.
        start_epoch: in ``fit``, the first epoch that collects.
        every_n_batches: in ``fit``, collect on every n-th training batch only (1: every batch). The
            factors are then expectations over a 1/n sample of the batches; the time spent on the
            training steps that are not collected is the training's alone
            (``benchmarks/kfac_fit_overhead.py`` measures overhead and factor error per rate).
        token_fraction: ``p`` in ``(0, 1]``: each batch of a covariance pass adds ``A`` and ``G`` of
            about ``p·n`` of its ``n`` real tokens only, each weighted by one over its chance of being
            sampled, so the factors are unbiased estimates of the full-rate ones and the covariance
            products cost ``p`` of theirs (the rows are gathered before multiplying). How the tokens
            are chosen: ``token_sampling``. The sample is drawn from ``seed``, the process's rank and the batch's
            position (``global_step`` and batch index in ``fit``; pass and examples seen in an own
            pass), so a rerun or a resumed fit draws the same tokens. It applies to every covariance
            pass; in ``fit`` it is combined with ``every_n_batches`` for a lower overhead, in the other
            stages it saves only the products, not the collector's own forward/backward. EKFAC's
            lambda pass is per example and is never sampled. ``1`` (default): every token, as before.
        token_sampling: with ``token_fraction < 1``, ``"norm"`` (default) keeps token ``t`` with a chance
            proportional to ``‖x_t‖²`` (capped at 1, mixed with 10 % uniform), apart for each input's
            ``A`` and each layer's ``G``: the sampling of least expected Frobenius error, which keeps
            the few tokens that carry most of ``‖g‖²`` (about 4× less error in ``G`` than uniform at
            ``p = 0.5`` on ``benchmarks/kfac_fit_overhead.py``); ``"uniform"`` takes one random
            ``round(p·n)`` of the tokens per batch for every layer.
        covariance_dtype: ``bfloat16`` computes each batch's ``A`` and ``G`` products (the collector's
            main cost in ``fit``) in bfloat16 with float32 accumulation inside the product, added to the
            ``dtype`` sums: the product itself about 4× faster on a CPU with AMX, though the per-batch traffic on
            the ``d × d`` sums remains (in-fit step 1.68 → 1.55 × plain at width 512); each batch's product is rounded
            to bfloat16 (2⁻⁹ per entry), errors that average out over batches and tokens
            (``benchmarks/kfac_fit_overhead.py`` reports the factor error next to the overhead). Default
            ``null``: ``dtype``. EKFAC's lambda pass is not affected.
        deferred_rows: multiply ``A`` and ``G`` products once a layer holds this many token rows, gathered over
            several batches (only real tokens, each times the square root of its weight), instead of once per
            batch: the same factors up to round-off, with the per-batch traffic on the ``d × d`` sums paid once
            per several batches. It pays when a batch holds few tokens against the layers' widths: one
            ``2048``-wide layer's products per batch of 40 tokens took 3.9 → 2.8 ms (float32) and 6.6 → 1.5 ms
            (with ``covariance_dtype: bfloat16``); a width-512 fit at batch 2 went from 1.99 to 1.70 × plain in
            bfloat16, while at batch 8 (≈ 240 tokens) no gain showed (``benchmarks/kfac_fit_overhead.py``). Costs
            about ``deferred_rows × (in + out)`` values per layer while the rows wait; a checkpoint and the end
            of a pass multiply them first. Default ``null``: every batch at once.
        eigendecomposition_dtype: ``float64`` (default, like kronfluence's) or ``float32`` for the
            eigendecompositions of ``A`` and ``G``: about 3× faster (0.14 s against 0.42 s for ``1536 × 1536``
            on 2 cores), a fixed cost of the factors that does not shrink with fewer examples. The relative
            residual ``‖C V − V diag(w)‖_F / ‖C‖_F`` of each layer is checked; the largest is logged and
            written to ``factors.json`` (``eigendecomposition``), and above 1e-4 it is an error.
        inspect_modules: patterns of the layers to plot; default the last tracked ``down_proj``
            (or the last tracked layer).
        plots: write the inspection plots.
        overwrite: replace factors in ``output_dir`` that were made with other arguments.
        seed: seed of the label sampling of ``fisher: true`` and of the token sample of ``token_fraction``.
    """

    def __init__(
        self,
        target_modules: list[str] | None = None,
        strategy: Literal["kfac", "ekfac"] = "ekfac",
        fisher: Literal["empirical", "true"] = "empirical",
        stages: list[Stage] | None = None,
        max_examples: int | None = None,
        layers_per_pass: int | None = None,
        module_groups: list[list[str]] | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        output_dir: str | None = None,
        name: str = "factors",
        loss_fn: LossFn | None = None,
        task: Task | None = None,
        train_loss_reduction: Literal["auto", "sum", "example_mean", "token_mean"] = "auto",
        check_train_loss: bool = True,
        start_epoch: int = 0,
        every_n_batches: int = 1,
        token_fraction: float = 1.0,
        token_sampling: Literal["norm", "uniform"] = "norm",
        covariance_dtype: Literal["bfloat16"] | None = None,
        deferred_rows: int | None = None,
        eigendecomposition_dtype: Literal["float64", "float32"] = "float64",
        inspect_modules: list[str] | None = None,
        plots: bool = True,
        overwrite: bool = False,
        seed: int = 0,
    ) -> None:
        problems = []
        if max_examples is not None and max_examples < 1:
            problems.append(f"max_examples must be at least 1 (or null for all examples); got {max_examples}")
        if every_n_batches < 1:
            problems.append(f"every_n_batches must be at least 1; got {every_n_batches}")
        if isinstance(token_fraction, bool) or not isinstance(token_fraction, (int, float)) \
                or not 0 < token_fraction <= 1:
            problems.append(f"token_fraction must be a number in (0, 1] (the fraction of each batch's real tokens "
                            f"that K-FAC's A and G are estimated from; 1 for every token); got {token_fraction!r}")
        if token_sampling not in ("norm", "uniform"):
            problems.append(f"token_sampling must be 'norm' or 'uniform'; got {token_sampling!r}")
        if eigendecomposition_dtype not in ("float64", "float32"):
            problems.append(f"eigendecomposition_dtype must be 'float64' or 'float32'; got {eigendecomposition_dtype!r}")
        if covariance_dtype not in (None, "bfloat16"):
            problems.append(f"covariance_dtype must be 'bfloat16' or null (dtype); got {covariance_dtype!r}")
        if deferred_rows is not None and (isinstance(deferred_rows, bool) or not isinstance(deferred_rows, int)
                                          or deferred_rows < 1):
            problems.append(f"deferred_rows must be a whole number of token rows, at least 1 (or null: every batch "
                            f"at once); got {deferred_rows!r}")
        if layers_per_pass is not None and layers_per_pass < 1:
            problems.append(f"layers_per_pass must be at least 1; got {layers_per_pass}")
        if layers_per_pass is not None and module_groups is not None:
            problems.append("give layers_per_pass or module_groups, not both")
        if strategy not in ("kfac", "ekfac"):
            problems.append(f"strategy must be 'kfac' or 'ekfac'; got '{strategy}'")
        if fisher not in ("empirical", "true"):
            problems.append(f"fisher must be 'empirical' or 'true'; got '{fisher}'")
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {list(DTYPES)}; got '{dtype}'")
        stages = list(stages or ["fit", "validate", "test", "predict"])
        if unknown := [s for s in stages if s not in ("fit", "validate", "test", "predict")]:
            problems.append(f"unknown stages {unknown}; choose among fit, validate, test, predict")
        if problems:
            raise ConfigError("invalid KFACCollectorCallback arguments:\n  - " + "\n  - ".join(problems))
        self.target_modules = list(target_modules or ["*.mlp.*_proj"])
        self.strategy = strategy
        self.fisher = fisher
        self.stages = stages
        self.max_examples = max_examples
        self.layers_per_pass = layers_per_pass
        self.module_groups = module_groups
        self.dtype = DTYPES[dtype]
        self.output_dir = output_dir
        self.name = name
        self.loss_fn = loss_fn
        self.task = task
        self.train_loss_reduction = train_loss_reduction
        self.check_train_loss = check_train_loss
        self.start_epoch = start_epoch
        self.every_n_batches = every_n_batches
        self.token_fraction = float(token_fraction)
        self.token_sampling = token_sampling
        self.covariance_dtype = covariance_dtype
        self.deferred_rows = deferred_rows
        self.eigendecomposition_dtype = eigendecomposition_dtype
        self.inspect_modules = inspect_modules
        self.plots = plots
        self.overwrite = overwrite
        self.seed = seed

        self._layers: dict[str, LayerInfo] = {}
        self._groups: list[list[str]] = []
        self._pass = 0
        self._pass_examples = 0
        self._accumulator: KFACAccumulator | None = None
        self._tracker: LayerTracker | None = None
        self._pending_state: dict | None = None
        self._stage: str | None = None
        self._where = ""
        self._max_uses: dict[str, int] = {}
        self._generator: torch.Generator | None = None
        self._written: Path | None = None
        self._trainer: Trainer | None = None
        self._task: Task | None = None
        self._train_scale: TrainLossScale | None = None
        self._checked_layers = False
        self._batch_idx = 0

    # ------------------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def arguments(self) -> dict:
        """The arguments that determine the factors (stored in ``factors.json``, compared on reuse)."""
        return {
            "target_modules": self.target_modules, "strategy": self.strategy, "fisher": self.fisher,
            "max_examples": self.max_examples, "layers_per_pass": self.layers_per_pass,
            "module_groups": self.module_groups, "dtype": str(self.dtype).replace("torch.", ""),
            "loss_fn": function_name(self.loss_fn),
            **({"every_n_batches": self.every_n_batches} if self.every_n_batches != 1 else {}),
            **({"token_fraction": self.token_fraction, "token_sampling": self.token_sampling}
               if self.token_fraction != 1 else {}),
            **({"covariance_dtype": self.covariance_dtype} if self.covariance_dtype else {}),
            **({"deferred_rows": self.deferred_rows} if self.deferred_rows is not None else {}),
            **({"eigendecomposition_dtype": self.eigendecomposition_dtype}
               if self.eigendecomposition_dtype != "float64" else {}),
        }

    @property
    def passes(self) -> list[tuple[str, int]]:
        """``(phase, group)`` in order: each group's covariance pass, then its lambda pass (EKFAC)."""
        phases = ["covariance", "lambda"] if self.strategy == "ekfac" else ["covariance"]
        return [(phase, group) for group in range(len(self._groups)) for phase in phases]

    # ------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        if stage == "predict":
            ensure_predict_step(pl_module, self)
        folder = self._folder(trainer)
        if factors_exist(folder) and not self.overwrite:
            saved = json.loads((folder / METADATA_FILE).read_text()).get("arguments", {})
            if saved != self.arguments():
                differing = sorted(k for k in set(saved) | set(self.arguments()) if saved.get(k) != self.arguments().get(k))
                raise ArtifactError(
                    f"'{folder}' already holds factors made with other arguments ({', '.join(differing)} differ); "
                    f"choose another output_dir or name, or set overwrite=True to replace them"
                )

    def _folder(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / self.name

    def _begin(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> bool:
        """Select layers and restore state when a stage starts; False when nothing is to be done here."""
        if stage not in self.stages or self._written is not None:
            return False
        self._stage = stage
        self._trainer = trainer
        needs = ("loss",) if stage != "fit" or self.strategy == "ekfac" else ()
        needs += ("logits",) if self.fisher == "true" else ()
        self._task = resolve_task(pl_module, self.task, self.loss_fn, owner=f"{type(self).__name__}[{self.name}]",
                                  needs=needs)
        if stage == "fit" and self.fisher == "empirical":
            self._train_scale = TrainLossScale(self.train_loss_reduction, self._task, f"{type(self).__name__}[{self.name}]",
                                            check=self.check_train_loss)
            self._train_scale.setup(pl_module)
        if not self._layers:
            self._layers = find_layers(pl_module, self.target_modules)
            self._groups = self._make_groups(pl_module)
            self._accumulator = KFACAccumulator(self._layers, self.dtype, pl_module.device,
                                                product_dtype=torch.bfloat16 if self.covariance_dtype else None,
                                                eigen_dtype=DTYPES[self.eigendecomposition_dtype],
                                                deferred_rows=self.deferred_rows)
            self._tracker = LayerTracker(self._layers, self._on_activation, self._on_gradient).attach()
            self._tracker.active = False
            self._generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)
            if self._pending_state is not None:
                self._restore(self._pending_state, pl_module.device)
                self._pending_state = None
        if self._pass >= len(self.passes):
            return False
        if stage != "fit":
            self._announce(f"the {stage} loop")
        elif self._fit_epoch_collects(trainer):
            self._announce(f"training epoch {max(trainer.current_epoch, self.start_epoch)}")
        return True

    def _make_groups(self, pl_module: LightningModule) -> list[list[str]]:
        names = list(self._layers)
        if self.module_groups is not None:
            groups = [list(find_layers(pl_module, patterns)) for patterns in self.module_groups]
            missing = sorted(set(names) - {n for group in groups for n in group})
            if missing:
                raise ModelError(f"module_groups leave tracked layers out of every group: {missing[:8]}")
            return groups
        size = self.layers_per_pass or len(names)
        return [names[i:i + size] for i in range(0, len(names), size)]

    def _announce(self, where: str) -> None:
        phase, group = self.passes[self._pass]
        later = len(self.passes) - self._pass - 1
        rank_zero_info(
            f"{type(self).__name__}[{self.name}]: {phase} pass {self._pass + 1}/{len(self.passes)} over "
            f"{len(self._groups[group])} layer(s) in {where}"
            + (f"; {later} more pass(es) follow (the EKFAC eigenvalue correction needs its own pass)" if later else "")
        )

    # ------------------------------------------------------------------------------ hooks
    def _on_activation(self, layer: LayerInfo, use: int, activations: torch.Tensor) -> None:
        self._max_uses[layer.name] = max(self._max_uses.get(layer.name, 0), use + 1)

    def _on_gradient(self, layer: LayerInfo, use: int, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        if self.passes[self._pass][0] == "covariance":
            # A is added with G, when the backward reaches the use: a forward without a backward (a training
            # step that returns None) adds to neither, so A and G always cover the same tokens.
            self._accumulator.add_activations(layer, activations)
            self._accumulator.add_gradients(layer, gradients)
        else:  # the layer's last use squares its per-example buffer into Λ's sum and frees it
            self._accumulator.add_rotated_gradient(layer, activations, gradients,
                                                   last=self._tracker.last_use(layer.name))

    # ----------------------------------------------------------------------------- fit
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin(trainer, pl_module, "fit")
        if self._tracker is not None:  # hooked only on the batches it collects: the others run at full speed
            self._tracker.detach()

    def _fit_epoch_collects(self, trainer: Trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch and self._pass < len(self.passes)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._stage != "fit" or not self._fit_epoch_collects(trainer) or batch_idx % self.every_n_batches:
            return
        self._where = f"training step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        self._batch_idx = batch_idx
        if self.fisher == "true":
            return
        scale = self._train_scale.for_batch(trainer, pl_module, batch, batch_idx)
        if scale is not None and self._start_batch(trainer, batch, scale, own_pass=False):
            self._tracker.attach()
            self._tracker.reset()
            self._tracker.active = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stage != "fit" or not self._fit_epoch_collects(trainer) or batch_idx % self.every_n_batches:
            return
        if self.fisher == "true":
            self._own_pass(trainer, pl_module, batch)
        elif self._tracker.active:
            if not self._checked_layers and self._tracker.reached:  # the first batch with a backward shows
                # whether every tracked layer is really used (a step that returned None ran no backward)
                self._tracker.check_seen("training_step")
                self._tracker.check_reached()
                self._checked_layers = True
            self._tracker.active = False
            self._tracker.detach()
            self._end_batch(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "fit" and self._fit_epoch_collects(trainer):
            self._finish_pass(trainer)
            if self._pass == len(self.passes):
                self._write(trainer)  # now, not at the end of training: a later crash loses nothing
            elif trainer.current_epoch + 1 < trainer.max_epochs:
                self._announce(f"training epoch {trainer.current_epoch + 1}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage != "fit" or self._written is not None:
            return
        self._run_remaining_passes(trainer, pl_module, trainer.train_dataloader)
        self._write(trainer)

    # ------------------------------------------------------------------- own-pass stages
    def _stage_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.state.fn == stage:
            self._begin(trainer, pl_module, stage)

    def _stage_batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: str,
                         batch_idx: int) -> None:
        if self._stage == stage and trainer.state.fn == stage and self._pass == 0 and self._written is None:
            self._where = f"{stage} batch {batch_idx}"
            self._own_pass(trainer, pl_module, batch)

    def _stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str, loaders: Any) -> None:
        if self._stage != stage or trainer.state.fn != stage or self._written is not None:
            return
        if self._pass == 0:
            self._finish_pass(trainer)
        self._run_remaining_passes(trainer, pl_module, loaders)
        self._write(trainer)

    @override
    def on_validation_start(self, trainer, pl_module):
        self._stage_start(trainer, pl_module, "validate")

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stage_batch_end(trainer, pl_module, batch, "validate", batch_idx)

    @override
    def on_validation_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "validate", trainer.val_dataloaders)

    @override
    def on_test_start(self, trainer, pl_module):
        self._stage_start(trainer, pl_module, "test")

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stage_batch_end(trainer, pl_module, batch, "test", batch_idx)

    @override
    def on_test_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "test", trainer.test_dataloaders)

    @override
    def on_predict_start(self, trainer, pl_module):
        self._stage_start(trainer, pl_module, "predict")

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stage_batch_end(trainer, pl_module, batch, "predict", batch_idx)

    @override
    def on_predict_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "predict", trainer.predict_dataloaders)

    # --------------------------------------------------------------------- the passes
    def _start_batch(self, trainer: Trainer, batch: Any, gradient_scale: float, own_pass: bool) -> Any:
        """Set the token mask and count the batch against ``max_examples``; ``None`` when the pass is full.

        An own pass cuts the batch to the examples still wanted; while observing training the whole
        batch counts (``max_examples`` rounds up to whole batches in ``fit``).
        """
        size = self._task.batch_size(batch)
        if self.max_examples is not None:
            wanted = math.ceil(self.max_examples / trainer.world_size) - self._pass_examples
            if wanted <= 0:
                return None
            if own_pass and wanted < size:
                batch = slice_batch(batch, wanted)
                size = wanted
        phase, group = self.passes[self._pass]
        self._tracker.enabled = set(self._groups[group])
        if phase == "covariance" and self.token_fraction < 1:
            position = (1, self._pass, self._pass_examples) if own_pass else (0, trainer.global_step, self._batch_idx)
            self._accumulator.begin_batch(self._task.padding_mask(batch), gradient_scale, self.token_fraction,
                                          self._token_generator(trainer, *position), self.token_sampling)
        else:
            self._accumulator.begin_batch(self._task.padding_mask(batch), gradient_scale)
        self._pass_examples += size
        return batch

    def _token_generator(self, trainer: Trainer, *position: int) -> torch.Generator:
        """The CPU generator of one batch's token sample: a function of ``seed``, rank and the batch's position."""
        key = hash((self.seed, trainer.global_rank, *position)) % 2**63  # ints hash alike in every process and run
        return torch.Generator().manual_seed(key)

    def _end_batch(self, trainer: Trainer) -> None:
        if bad := self._accumulator.end_batch():
            raise TrainingError(
                f"{type(self).__name__}[{self.name}]: non-finite values in {bad[:4]} in {self._where}; the "
                f"activations or gradients of that layer hold NaN/Inf. "
                f"No factors were written. Check the data and the loss of that step (e.g. lower the learning rate)."
            )

    def _own_pass(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Forward and backward of the collector's own, leaving the parameters' ``.grad`` untouched."""
        with torch.inference_mode(False):
            batch = self._start_batch(trainer, clone_batch(batch), 1.0, own_pass=True)
        if batch is None:
            return
        loss = "sampled_loss" if self.fisher == "true" else "loss"
        self._tracker.attach()  # in fit the hooks come and go with the batches that collect
        own_backward(trainer, pl_module, self._tracker, self._task, batch, loss=loss, generator=self._generator)
        if self._stage == "fit":
            self._tracker.detach()
        self._end_batch(trainer)

    def _finish_pass(self, trainer: Trainer) -> None:
        phase, group = self.passes[self._pass]
        names = self._groups[group]
        self._accumulator.reduce(names, _PHASE_KEYS[phase], lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        if phase == "covariance":
            if self.strategy == "ekfac":  # A and G sums wait on disk (read back one layer at a time) until written
                folder = self._folder(trainer)
                self._accumulator.spill(names, folder / f".covariance-sums-group{group}-rank{trainer.global_rank}.tmp")
                release_freed_memory()  # the sums
            self._accumulator.eigendecompose(names)
            self._check_eigen_residuals(names)
            if self.strategy == "ekfac":
                self._accumulator.allocate_lambda(names)
            release_freed_memory()  # the float64 temporaries of the eigendecompositions
        self._pass += 1
        self._pass_examples = 0

    def _run_remaining_passes(self, trainer: Trainer, pl_module: LightningModule, loaders: Any) -> None:
        loaders = self._as_list(loaders)
        was_training = pl_module.training
        pl_module.eval()  # after training: dropout off, as for every analysis pass
        try:
            self._remaining_passes(trainer, pl_module, loaders)
        finally:
            pl_module.train(was_training)

    def _remaining_passes(self, trainer: Trainer, pl_module: LightningModule, loaders: list) -> None:
        while self._pass < len(self.passes):
            self._announce("an extra loop over the data")
            for loader in loaders:
                progress = tqdm(loader, desc=f"{self.name}: {self.passes[self._pass][0]} pass",
                                disable=not show_progress(trainer), leave=False)
                for batch_idx, batch in enumerate(progress):
                    self._where = f"batch {batch_idx} of the {self.passes[self._pass][0]} pass"
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    self._own_pass(trainer, pl_module, batch)
            self._finish_pass(trainer)

    @staticmethod
    def _as_list(loaders: Any) -> list:
        if loaders is None:
            return []
        iterables = getattr(loaders, "iterables", loaders)  # Lightning's CombinedLoader
        if isinstance(iterables, dict):
            return list(iterables.values())
        return list(iterables) if isinstance(iterables, (list, tuple)) else [iterables]

    # --------------------------------------------------------------------------- writing
    def _check_eigen_residuals(self, names: list[str]) -> None:
        """With float32 eigendecompositions: log the largest residual, refuse one above ``MAX_EIGEN_RESIDUAL``."""
        residuals = {name: self._accumulator.eigen_residuals[name] for name in names
                     if name in self._accumulator.eigen_residuals}
        if not residuals:
            return
        worst = max(residuals, key=residuals.get)
        if residuals[worst] > MAX_EIGEN_RESIDUAL:
            raise TrainingError(f"{type(self).__name__}[{self.name}]: the float32 eigendecomposition of layer '{worst}' "
                                f"is off by {residuals[worst]:.2g} (relative residual, more than {MAX_EIGEN_RESIDUAL:g}); "
                                f"use eigendecomposition_dtype float64")
        rank_zero_info(f"{type(self).__name__}[{self.name}]: float32 eigendecompositions of {len(residuals)} layer(s), "
                       f"largest relative residual {residuals[worst]:.2g} ('{worst}')")

    def _write(self, trainer: Trainer) -> None:
        if self._pass < len(self.passes):
            return
        folder = self._folder(trainer)
        if trainer.is_global_zero:
            # one module's tensors at a time, each written before the next is made
            modules = ((name, self._accumulator.factors(name, self.strategy, self.dtype)) for name in self._layers)
            counts = self._accumulator.counts
            metadata = {
                "name": self.name,
                "arguments": self.arguments(),
                "stage": self._stage,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "modules": {
                    name: {**layer.describe(), "uses_per_forward": self._max_uses.get(name, 0), **counts[name]}
                    for name, layer in self._layers.items()
                },
                "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
            }
            if self.eigendecomposition_dtype != "float64":
                residuals = self._accumulator.eigen_residuals
                metadata["eigendecomposition"] = {"dtype": self.eigendecomposition_dtype,
                                                  "largest_relative_residual": max(residuals.values(), default=None),
                                                  "relative_residuals": residuals}
            save_factors(folder, modules, metadata)
            rank_zero_info(f"{type(self).__name__}[{self.name}]: factors of {len(self._layers)} layer(s) written to {folder}")
            if self.plots:
                from lit_attrib.plotting import inspect_selection, write_factor_plots

                shown = inspect_selection(list(self._layers), self.inspect_modules)  # read only the layers plotted
                write_factor_plots(load_factors(folder, names=shown), folder, self.inspect_modules, logger=trainer.logger,
                                   tag=self.name, step=trainer.global_step)
        self._written = folder
        trainer.strategy.barrier()
        self._tracker.detach()

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._accumulator is None:
            return {"pass": self._pass, "pass_examples": self._pass_examples}
        state = {
            "pass": self._pass,
            "pass_examples": self._pass_examples,
            "accumulator": self._accumulator.state_dict(),
            "max_uses": dict(self._max_uses),
            "arguments": self.arguments(),
        }
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and self._pass < len(self.passes):
            # Each process holds part of the running pass; the checkpoint (rank zero's copy) needs the total.
            # Lightning builds checkpoints on every rank, so this collective is matched.
            phase, group = self.passes[self._pass]
            total = KFACAccumulator(self._layers, self.dtype, trainer.strategy.root_device)
            total.load_state_dict(state["accumulator"], trainer.strategy.root_device)
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            total.reduce(self._groups[group], _PHASE_KEYS[phase], reduce)
            state["accumulator"] = total.state_dict()
            state["pass_examples"] = int(reduce(torch.tensor(float(self._pass_examples),
                                                             device=trainer.strategy.root_device)))
            state["world_size"] = trainer.world_size
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Layers are only known once the model exists (after configure_model): apply when the stage starts.
        self._pending_state = state_dict

    def _restore(self, state: dict, device: torch.device) -> None:
        if state.get("arguments", self.arguments()) != self.arguments():
            raise ArtifactError(f"{type(self).__name__}[{self.name}]: the checkpoint's collection used other arguments "
                                f"({state.get('arguments')}); resume with the same ones")
        self._pass = state.get("pass", 0)
        self._pass_examples = state.get("pass_examples", 0)
        self._max_uses = dict(state.get("max_uses", {}))
        if "accumulator" in state:
            self._accumulator.load_state_dict(state["accumulator"], device)
        world_size = state.get("world_size", 1)
        if world_size > 1 and self._pass < len(self.passes):
            # The running pass's sums are totals over all ranks: rank zero keeps them, the others restart at 0.
            self._pass_examples = self._pass_examples // world_size
            if self._trainer.global_rank != 0:
                phase, group = self.passes[self._pass]
                self._accumulator.clear(self._groups[group], _PHASE_KEYS[phase])
    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        release_predict_step(pl_module, self)
        if self._accumulator is not None:
            self._accumulator.drop_spilled()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._tracker is not None:
            self._tracker.detach()
        release_predict_step(pl_module, self)
        if self._accumulator is not None:  # spilled sums live until here: a checkpoint may still read them
            self._accumulator.drop_spilled()
