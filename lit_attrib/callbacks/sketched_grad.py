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

from typing import Literal

import torch
from typing_extensions import override

from lit_attrib.callbacks._common import (
    DTYPES,
)
from lit_attrib.callbacks.sdi_checkpoints import _CheckpointReplay
from lit_attrib.callbacks.sdi_online import _OnlineTracIn
from lit_attrib.engine.data import (
    DataSource,
    ExampleIds,
    source_name,
)
from lit_attrib.engine.gradient_pass import TrainLossScale
from lit_attrib.engine.task import LossFn, Task, function_name
from lit_attrib.engine.tracking import LayerTracker
from lit_attrib.errors import ConfigError
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.step_features import GradientFeatures
from lit_attrib.ops.tracin import TracInRows

__all__ = ["SketchedGradCallback"]


class SketchedGradCallback(_CheckpointReplay, _OnlineTracIn):
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
        check_train_loss: re-run ``training_step`` once without gradients, on the first training batch,
            to check (or find) the reduction (its ``self.log`` calls are muted; anything else it does,
            such as torchmetrics updates or BatchNorm statistics, happens once more); ``false`` trusts
            ``train_loss_reduction`` as stated.
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
        check_train_loss: bool = True,
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
        self.check_train_loss = check_train_loss
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
        self._tracin = TracInRows(self.dtype)
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
                "queries": source_name(self.queries), "train_data": source_name(self.train_data),
                "every_n_steps": self.every_n_steps, "seed": self.seed, "strict": self.strict,
                "dtype": str(self.dtype).replace("torch.", ""),
                "loss_fn": function_name(self.loss_fn)}
