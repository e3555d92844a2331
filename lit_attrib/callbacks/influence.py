"""InfluenceCallback: EKFAC influence of every training example on every query, in a ``predict`` pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.scores import save_tensors
from lit_attrib.callbacks._common import check_context, show_progress
from lit_attrib.callbacks._scoring import FactorScoringCallback, markdown_cell, tensorboard_text
from lit_attrib.engine.data import (
    DataSource,
    ExampleIds,
    batch_tokens,
    current_loader,
    fresh_loader,
    iterate_batches,
    loader_rows,
    resolve_loader,
    source_name,
)
from lit_attrib.engine.memory import format_bytes, parse_bytes, release_freed_memory
from lit_attrib.engine.task import LossFn, Task
from lit_attrib.errors import ConfigError, DataError, ModelError, TrainingError
from lit_attrib.io import ScratchTensors, write_json, write_jsonl
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.influence import (
    LayerMemory,
    LowRank,
    PairwiseScores,
    check_rank,
    layer_memory,
    low_rank,
    partition_layers,
    partition_need,
)
from lit_attrib.ops.kfac import LargestError, TokenGradients, default_damping, factors_inverse_hvp
from lit_attrib.ops.workspaces import Workspaces

__all__ = ["InfluenceCallback"]

FORMAT = "lit_attrib.scores/1"

QUERY_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
MAX_STORAGE_ERROR = 0.01
"""The largest relative rounding error a layer's stored query gradients may take (see ``query_dtype``)."""


class InfluenceCallback(FactorScoringCallback):
    """Influence ``I(z_q, z_m) = ∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)`` of each training example on each query.

    Run it in ``lit-attrib predict`` over the training set as whole examples (``TextDataModule``'s
    ``predict_split: train`` and ``predict_content: examples``). When the pass starts, it computes
    each query's gradient (queries from the datamodule's ``<queries>_dataloader()``, e.g.
    ``TextDataModule.query_dataloader``, which reads the validation split, a file of questions or a
    ``generated.jsonl`` of model answers) and preconditions it once with the saved EKFAC factors,
    ``P_q = (H + λI)⁻¹ ∇L(z_q)``, optionally cut to rank r. Each training batch is then scored from
    its layers' activations and output gradients (``Σ_t g_tᵀ P_q a_t``) in one backward pass.
    **Positive = the training example lowers the query's loss (helpful).**

    Memory: per-example gradients are held one layer at a time (each layer's are preconditioned as
    soon as its last use is through the backward); the stored query gradients ``P`` (``Q × params``
    of the tracked layers, or ``Q·r·(out + in)`` per layer at rank r) are what grows. ``query_dtype``
    stores them narrower; ``query_storage: disk`` keeps them in a scratch file and reads one layer's at a
    time during the training pass; ``memory_budget`` splits the tracked layers into consecutive groups whose
    query gradients and per-batch working memory fit the budget, and runs the pass once per group
    (scores are a sum over layers, so the groups' scores add up to those of one pass; the queries'
    gradients and the training data are computed once per group, the predict loop's batches serving
    the last group). It logs what it chose and records it in ``scores.json`` (``memory``).

    Writes ``scores.safetensors`` (``scores (N_query, N_train)`` in dataset index order, the
    indices, optionally ``token_scores (N_query, N_train, T)`` that sum over T to ``scores``),
    ``topk.jsonl`` (each query's ``top_k`` most helpful and most harmful training examples with
    their text) and ``scores.json``; the top-k also as a TensorBoard text table. Partial results are
    written every ``chunk_size`` examples, so a killed pass run again resumes where it stopped.

    Args:
        factors: folder of the EKFAC (or K-FAC) factors from ``KFACCollectorCallback``.
        queries: the queries: a datamodule loader's name (``<queries>_dataloader()``), a
            ``DataLoader``, a dataset, or a json/jsonl file (tokenized like the run's data).
        target_modules: fnmatch patterns of the layers to use; default every layer the factors hold.
        query_gradient_rank: cut each preconditioned query gradient to this rank (truncated SVD);
            ``null`` keeps full rank.
        expand_low_rank_gb: a rank-r query gradient is contracted through the tokens
            (``T·Q·r·(out + in)`` per example); where multiplying it back out to ``(Q, out, in)`` makes
            the contraction cheaper (``(T + Q)·out·in``), it is expanded, layer by layer, as long as the
            expanded layers take at most this many GB together (and, with ``memory_budget``, fit in
            what the budget leaves). 0 never expands (least memory).
        damping: ``λ``; default ``0.1 · mean(Λ)`` per layer.
        top_k: helpful and harmful examples listed per query.
        token_scores: also keep each training token's share of the score.
        dtype: precision of the gradients, the contraction and the scores.
        query_dtype: precision the preconditioned query gradients are stored in (``float64``,
            ``float32``, ``bfloat16``, ``float16``); default ``dtype``. Narrower storage halves (or
            quarters) their memory; each is cast back to ``dtype`` for its layer's contraction, so the
            only error is the storage rounding: a relative error of up to 2⁻¹¹ ≈ 4.9e-4 per entry in
            float16 (range ±65504) and 2⁻⁸ ≈ 3.9e-3 in bfloat16 (float32's range), which the scores
            inherit at about that relative size. The largest relative (Frobenius) rounding error seen is
            logged and recorded in ``scores.json``; a value that overflows, or a layer that loses more
            than 1 % (float16 flushing tiny gradients to zero), is an error rather than a wrong score.
        query_storage: ``memory`` (default) holds every layer's preconditioned query gradients for the
            training pass; ``disk`` writes them to a hidden scratch file in the output folder
            (``.query-gradients-rank<r>.tmp``, deleted when the pass ends or fails) and reads each layer's
            back when the training backward reaches it, into one buffer per layer shape: only one layer's
            are resident, the rest stay in the OS's page cache (not the process's memory), for one read of
            ``Q × params × bytes`` per training batch (memory speed while the page cache holds the file).
            Full rank only (rank-r query gradients are small). Scores are the same as in memory.
        precondition_dtype: ``bfloat16`` (or ``float16``) runs the rotation of each preconditioned query
            gradient back out of the eigenbasis (``Q_G M Q_Aᵀ``, ``out·in·(out + in)`` multiply-adds per
            query: most of the preconditioning, and on a real model most of the queries' time) in that
            dtype with float32 accumulation: about 2× faster per layer on a CPU with AMX (SmolLM2's MLP
            shapes), for a relative error of about 2⁻⁸ (bfloat16), like storing the result in
            ``query_dtype`` bfloat16. The error is measured against ``dtype`` on 64 evenly spaced rows of every batch;
            the largest is logged and recorded in ``scores.json`` (``precondition_error``), and above
            1 % it is an error. Default ``null``: everything in ``dtype``.
        scoring_dtype: ``bfloat16`` runs the training side of full-rank scores in bfloat16: each training
            example's per-layer gradient ``DW_b = Σ_t g_t a_tᵀ`` is multiplied from bfloat16 ``a`` and ``g``
            (float32 sums inside the product) and rounded to bfloat16, and with ``query_dtype: bfloat16`` it is
            contracted with the stored query gradients as they are, in bfloat16 (no float32 copy of them per
            layer and batch; each layer's scores are then rounded to bfloat16 too, 2⁻⁹ relative). Against
            ``dtype``, the relative (Frobenius) error of the first example's ``DW`` of every batch and layer
            is measured; the largest is logged and recorded in ``scores.json`` (``scoring_error``, over the
            batches this run scored), and above 1 % it is an error. Full-rank scores only (no
            ``query_gradient_rank``, no ``token_scores``). Default ``null``: everything in ``dtype``.
        memory_budget: bytes (an int) or a string such as ``"4GB"`` / ``"512MB"`` (KB, MB, GB, TB are
            powers of 1024, like ``expand_low_rank_gb``) for what the pass holds beyond the model's own
            forward and backward: the stored query gradients plus the largest per-layer working memory
            of a batch (per-example gradients, inverse-HVP intermediates, casts), estimated from the
            layer shapes, the number of queries and the batch sizes before any work. If the tracked
            layers need more, they are split into groups that fit (see above); a budget too small for
            one layer is an error before any forward. ``null``: no limit, one pass.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]``, each example's summed loss (shortcut for
            ``task=Task(loss_fn=...)``); not needed for lit_attrib's modules and wrapped Hugging Face models.
        task: what lit_attrib needs to know about the module's batches and loss
            (:class:`lit_attrib.engine.Task`): the loss, example ids, token masks.
        output_dir: artifact folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name (folder and TensorBoard tag).
        chunk_size: training examples per partial-results file.
        overwrite: replace scores in ``output_dir`` that were made with other arguments.

    Raises:
        ConfigError: invalid arguments; a ``memory_budget`` that cannot hold one layer (before any
            forward; the message gives the need and the knobs that lower it).

    Example::

        InfluenceCallback(factors="runs/factors", queries="query", memory_budget="4GB",
                          query_dtype="bfloat16")
    """

    def __init__(
        self,
        factors: str,
        queries: DataSource = "query",
        target_modules: list[str] | None = None,
        query_gradient_rank: int | None = None,
        expand_low_rank_gb: float = 1.0,
        damping: float | None = None,
        top_k: int = 10,
        token_scores: bool = False,
        dtype: str = "float32",
        loss_fn: LossFn | None = None,
        output_dir: str | None = None,
        name: str = "influence",
        chunk_size: int = 256,
        overwrite: bool = False,
        task: Task | None = None,
        query_dtype: str | None = None,
        memory_budget: str | int | float | None = None,
        query_storage: Literal["memory", "disk"] = "memory",
        precondition_dtype: str | None = None,
        scoring_dtype: str | None = None,
    ) -> None:
        if query_gradient_rank is not None and query_gradient_rank < 1:
            raise ConfigError(f"query_gradient_rank must be at least 1 (or null for full rank); got {query_gradient_rank}")
        if expand_low_rank_gb < 0:
            raise ConfigError(f"expand_low_rank_gb must be non-negative; got {expand_low_rank_gb}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1; got {top_k}")
        if query_dtype is not None and query_dtype not in QUERY_DTYPES:
            raise ConfigError(f"query_dtype must be one of {list(QUERY_DTYPES)} (or null for dtype); "
                              f"got '{query_dtype}'")
        if precondition_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"precondition_dtype must be 'bfloat16', 'float16' or null (the compute dtype); "
                              f"got {precondition_dtype!r}")
        if scoring_dtype not in (None, "bfloat16"):
            raise ConfigError(f"scoring_dtype must be 'bfloat16' or null (the compute dtype); got {scoring_dtype!r}")
        if scoring_dtype is not None and (query_gradient_rank is not None or token_scores):
            raise ConfigError("scoring_dtype bfloat16 is for full-rank scores (it narrows the training examples' "
                              "per-layer gradients, which rank-r query gradients and token_scores never form); "
                              "drop query_gradient_rank and token_scores, or set scoring_dtype null")
        if query_storage not in ("memory", "disk"):
            raise ConfigError(f"query_storage must be 'memory' or 'disk'; got {query_storage!r}")
        if query_storage == "disk" and query_gradient_rank is not None:
            raise ConfigError("query_storage 'disk' is for full-rank query gradients; rank-r ones "
                              f"(query_gradient_rank={query_gradient_rank}) are small: keep them in memory")
        super().__init__(factors, target_modules, damping, dtype, loss_fn, output_dir, name, chunk_size, overwrite,
                         task=task)
        self.queries = queries
        self.query_gradient_rank = query_gradient_rank
        self.top_k = top_k
        self.token_scores = token_scores
        self.expand_low_rank_gb = expand_low_rank_gb
        self.query_dtype = self.dtype if query_dtype is None else QUERY_DTYPES[query_dtype]
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget, "memory_budget")
        self.query_storage = query_storage
        self.precondition_dtype = None if precondition_dtype is None else QUERY_DTYPES[precondition_dtype]
        self.precondition_error = LargestError()
        self.scoring_dtype = None if scoring_dtype is None else QUERY_DTYPES[scoring_dtype]
        self.scoring_error = LargestError()
        self.memory: dict = {}
        self._damping: dict[str, float] = {}  # each layer's default damping, computed once
        self._workspaces = Workspaces()  # the preconditioning's intermediates and the disk path's results
        self.storage_error = 0.0
        self.preconditioned: dict[str, torch.Tensor | LowRank] | ScratchTensors = {}
        self._scores: PairwiseScores | None = None
        self._partitions: list[list[str]] = []
        self._partial: dict[int, dict[str, torch.Tensor]] = {}
        self._expanded: list[str] = []
        self._query_loader = None
        self.query_indices = torch.empty(0, dtype=torch.long)
        self.query_texts: list[str] = []

    def arguments(self) -> dict:
        # expand_low_rank_gb and memory_budget change the speed and the memory, not the scores
        return {**super().arguments(), "queries": source_name(self.queries), "query_gradient_rank": self.query_gradient_rank,
                "token_scores": self.token_scores, "query_dtype": str(self.query_dtype).replace("torch.", ""),
                **({"precondition_dtype": str(self.precondition_dtype).replace("torch.", "")}
                   if self.precondition_dtype is not None else {}),
                **({"scoring_dtype": "bfloat16"} if self.scoring_dtype is not None else {})}

    # ------------------------------------------------------------------------ the queries
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        if self.query_gradient_rank is not None:  # known from the shapes: refused before any forward
            for layer in self.layers.values():
                try:
                    check_rank(layer.gradient_shape, self.query_gradient_rank)
                except ValueError as exc:
                    raise ModelError(f"layer '{layer.name}': {exc}") from None
        self._query_loader = resolve_loader(self.queries, trainer, pl_module, "the queries")
        self._partitions = self._plan(trainer, pl_module)  # before any forward: a budget that cannot work stops here
        self._partial = {}
        self._expanded = []
        self.storage_error = 0.0
        self.precondition_error = LargestError()
        self.scoring_error = LargestError()
        self._compute_queries(trainer, pl_module, self._partitions[0])
        rank_zero_info(f"{type(self).__name__}[{self.name}]: {len(self.query_indices)} query gradient(s) "
                       f"preconditioned over {len(self.layers)} layer(s)"
                       + (f", rank {self.query_gradient_rank}" if self.query_gradient_rank else "")
                       + (f", stored in {self.memory['query_dtype']}" if self.query_dtype != self.dtype else ""))
        return {"queries": self.query_indices.tolist()}

    def _compute_queries(self, trainer: Trainer, pl_module: LightningModule, names: list[str]) -> None:
        """The preconditioned query gradients of the layers ``names``, in dataset index order."""
        self._close_scratch()
        self.preconditioned = {}
        self._scores = None
        if self.query_storage == "disk":
            self._compute_queries_to_disk(trainer, pl_module, names)
            return
        # Each layer's batch of query gradients is preconditioned (and cut to rank r, and cast to query_dtype)
        # as soon as its backward is done, so that only one layer's per-example gradients are ever held.
        # Full-rank gradients in the compute dtype go straight into one buffer per layer, rows in reading
        # order (no concatenation afterwards: that was a copy of every query gradient).
        capacity = loader_rows(self._query_loader, self._task)[0] if self.query_gradient_rank is None and \
            self.query_dtype == self.dtype else 0
        buffers: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}

        def precondition(layer: LayerInfo, gradients: TokenGradients) -> torch.Tensor | LowRank:
            start, size = filled.get(layer.name, 0), gradients.shape[0]
            if start + size > capacity:  # more rows than the loader said: kept per batch, joined below
                return self.precondition(layer, gradients)
            if layer.name not in buffers:
                buffers[layer.name] = torch.empty(capacity, *layer.gradient_shape, dtype=self.dtype,
                                                  device=gradients.activations.device)
            filled[layer.name] = start + size
            return self.precondition(layer, gradients, out=buffers[layer.name][start:start + size])

        parts, indices, texts, _ = self.example_gradients(
            trainer, pl_module, self._query_loader, "queries", per_example=precondition,
            layers={name: self.layers[name] for name in names}, label=source_name(self.queries))
        order = self._order_queries(indices, texts)
        in_order = torch.equal(order, torch.arange(len(order)))
        for name in names:  # one layer's batches concatenated at a time
            batches = parts.pop(name)
            if name in buffers and filled[name] == len(indices):  # every batch written into the buffer
                joined = buffers.pop(name)[:len(indices)]
                self.preconditioned[name] = joined if in_order else joined[order.to(joined.device)]
            elif self.query_gradient_rank is None:
                joined = torch.cat(batches)
                self.preconditioned[name] = joined if in_order else joined[order.to(joined.device)]
            else:
                left, right = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
                self.preconditioned[name] = (left, right) if in_order else \
                    (left[order.to(left.device)], right[order.to(right.device)])
            del batches
        self.factors.release(names)  # preconditioned: the training pass needs only P
        self._workspaces = Workspaces()
        release_freed_memory()  # the preconditioning's temporaries, freed between the kept query gradients

    def _compute_queries_to_disk(self, trainer: Trainer, pl_module: LightningModule, names: list[str]) -> None:
        """:meth:`_compute_queries` for ``query_storage: disk``: each layer's batch of preconditioned query
        gradients is computed into a buffer reused per layer shape and written to the scratch file at its rows."""
        owner = f"{type(self).__name__}[{self.name}]"
        capacity = loader_rows(self._query_loader, self._task)[0]
        if not capacity:
            raise ConfigError(f"{owner}: query_storage 'disk' needs a query loader whose number of rows is known "
                              f"before reading it (a map-style dataset); use query_storage 'memory'")
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        store = ScratchTensors(self.folder(trainer) / f".query-gradients-rank{trainer.global_rank}.tmp",
                               {name: ((capacity, *self.layers[name].gradient_shape), self.query_dtype) for name in names},
                               device)
        self.preconditioned = store  # closed by release / on_exception / teardown, also if this fails
        filled: dict[str, int] = {}

        def precondition(layer: LayerInfo, gradients: TokenGradients) -> None:
            start, size = filled.get(layer.name, 0), gradients.shape[0]
            if start + size > capacity:
                raise DataError(f"{owner}: the query loader gave more than the {capacity} rows it said it has")
            like = gradients.activations.new_empty(0, dtype=self.dtype)
            out = self._workspaces.get(size, layer.gradient_shape, like) if self.query_dtype == self.dtype else None
            store.write(layer.name, start, self.precondition(layer, gradients, out=out))
            filled[layer.name] = start + size

        _, indices, texts, _ = self.example_gradients(
            trainer, pl_module, self._query_loader, "queries", per_example=precondition,
            layers={name: self.layers[name] for name in names}, label=source_name(self.queries))
        self._order_queries(indices, texts)
        if any(filled.get(name, 0) != len(indices) for name in names) or len(indices) != capacity:
            raise DataError(f"{owner}: the query loader gave {len(indices)} rows, not the {capacity} it said it has")
        order = torch.argsort(indices)
        if not torch.equal(order, torch.arange(len(order))):
            for name in names:  # one layer at a time, in dataset index order
                store.write(name, 0, store[name][order.to(store[name].device)])
        self.factors.release(names)  # preconditioned: the training pass needs only P
        self._workspaces = Workspaces()
        release_freed_memory()

    def _order_queries(self, indices: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Check the queries' ids and keep them (and their texts) in dataset index order; return that order."""
        if len(indices.unique()) != len(indices):
            raise DataError(f"{type(self).__name__}[{self.name}]: the queries repeat example ids; each query needs "
                            f"its own")
        order = torch.argsort(indices)  # queries in dataset index order, like the training examples
        if len(self.query_indices) and not torch.equal(indices[order], self.query_indices):
            raise DataError(f"{type(self).__name__}[{self.name}]: the query loader gave other examples on its second "
                            f"reading (needed for memory_budget's layer groups); it must give the same rows each time")
        self.query_indices = indices[order]
        self.query_texts = [texts[i] for i in order.tolist()] if texts else texts
        return order

    def prepared_tensors(self) -> Iterator[torch.Tensor]:
        # A generator: query gradients on disk are read (into a reused buffer) one layer at a time.
        return (t for p in self.preconditioned.values() for t in (p if isinstance(p, tuple) else (p,)))

    def _close_scratch(self) -> None:
        if isinstance(self.preconditioned, ScratchTensors):
            self.preconditioned.close()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close_scratch()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_scratch()
        super().teardown(trainer, pl_module, stage)

    def release(self) -> None:
        self._close_scratch()
        self.preconditioned = {}
        self._partial = {}
        self._query_loader = None
        if self._scores is not None:  # keep what it decided (``expanded``), drop the query gradients
            self._scores.preconditioned = {}

    def precondition(self, layer: LayerInfo, gradients: TokenGradients,
                     out: torch.Tensor | None = None) -> torch.Tensor | LowRank:
        """``(H + λI)⁻¹ ∇L(z_q)`` of one layer for every query, cut to ``query_gradient_rank`` if set, in
        ``query_dtype`` (full rank in the compute dtype: written into ``out`` when given)."""
        factors = self.factors[layer.name]
        if self.damping is None:  # the default, once per layer (not per query batch)
            damping = self._damping.get(layer.name)
            if damping is None:
                damping = self._damping[layer.name] = default_damping(factors["lambda"].to(self.dtype))
        else:
            damping = self.damping
        preconditioned = factors_inverse_hvp(factors, gradients, damping, out=out, workspaces=self._workspaces,
                                             back_dtype=self.precondition_dtype, error=self.precondition_error)
        if self.precondition_error.value > MAX_STORAGE_ERROR:
            raise ConfigError(f"{type(self).__name__}[{self.name}]: precondition_dtype "
                              f"{str(self.precondition_dtype).replace('torch.', '')} changes layer '{layer.name}''s "
                              f"preconditioned query gradients by {self.precondition_error.value:.2%} (more than "
                              f"{MAX_STORAGE_ERROR:.0%}); use precondition_dtype bfloat16 or null")
        if preconditioned.dtype != self.dtype and (self.query_gradient_rank is not None
                                                   or preconditioned.dtype != self.query_dtype):
            preconditioned = preconditioned.to(self.dtype)  # narrower only where it is stored so anyway
        if self.query_gradient_rank is not None:
            try:
                preconditioned = low_rank(preconditioned, self.query_gradient_rank)
            except ValueError as exc:
                raise ModelError(f"layer '{layer.name}': {exc}") from None
        if self.query_dtype == self.dtype:
            return preconditioned
        if isinstance(preconditioned, tuple):
            return tuple(self._narrow(layer, part) for part in preconditioned)
        return self._narrow(layer, preconditioned)

    def _narrow(self, layer: LayerInfo, value: torch.Tensor) -> torch.Tensor:
        """``value`` in ``query_dtype``, refused where the rounding is not small (overflow, flush to zero)."""
        stored = value.to(self.query_dtype)
        back = stored.to(value.dtype)
        dtype = str(self.query_dtype).replace("torch.", "")
        if not bool(torch.isfinite(back).all()):
            raise ConfigError(f"{type(self).__name__}[{self.name}]: layer '{layer.name}''s preconditioned query "
                              f"gradients overflow query_dtype {dtype} (largest magnitude "
                              f"{float(value.abs().max()):.3g}); use query_dtype bfloat16 (float32's range) or float32")
        norm = float(value.norm())
        error = float((back - value).norm()) / norm if norm > 0 else 0.0
        if error > MAX_STORAGE_ERROR:
            raise ConfigError(f"{type(self).__name__}[{self.name}]: storing layer '{layer.name}''s preconditioned "
                              f"query gradients in {dtype} changes them by {error:.2%} (more than {MAX_STORAGE_ERROR:.0%}: "
                              f"values below its resolution); use query_dtype bfloat16 or float32")
        self.storage_error = max(self.storage_error, error)
        return stored

    @property
    def expanded(self) -> list[str]:
        """The layers whose rank-r query gradients were multiplied back out (see ``expand_low_rank_gb``)."""
        return self._expanded + (self._scores.expanded if self._scores is not None else [])

    # --------------------------------------------------------------------- memory plan
    def _plan(self, trainer: Trainer, pl_module: LightningModule) -> list[list[str]]:
        """The groups of layers to score one after another: one group without ``memory_budget`` or when
        everything fits; otherwise as few consecutive groups as fit. Reads the loaders' sizes only."""
        names = list(self.layers)
        self.memory = {"query_dtype": str(self.query_dtype).replace("torch.", ""), "budget": self.memory_budget,
                       "query_storage": self.query_storage, "partitions": [names]}
        if self.memory_budget is None:
            return [names]
        owner = f"{type(self).__name__}[{self.name}]"
        queries, query_batch, _ = loader_rows(self._query_loader, self._task)
        train_loader = fresh_loader(current_loader(trainer))
        train_rows, train_batch, first = loader_rows(train_loader, self._task)
        tokens = self._context or 1
        if self._context is None and (self.token_scores or self.query_gradient_rank or queries == 1):
            # The contraction goes through the tokens: their count from the model, else the first batch's.
            tokens = batch_tokens(self._task, first if first is not None else next(iter(train_loader), None))
        compute, stored = self.dtype.itemsize, self.query_dtype.itemsize
        memory = {name: layer_memory(layer.gradient_shape, queries, min(query_batch, queries), train_batch, tokens,
                                     self.query_gradient_rank, compute, stored, self.token_scores,
                                     None if self.scoring_dtype is None else self.scoring_dtype.itemsize)
                  for name, layer in self.layers.items()}
        if self.query_storage == "disk":  # a layer's query gradients are resident only while it is scored
            memory = {name: LayerMemory(0, m.working + m.query) for name, m in memory.items()}
        need = partition_need(memory, names)
        # Later groups add to the scores of earlier ones: those partial sums are held for this process's rows.
        partial = train_rows * queries * compute * (1 + (tokens if self.token_scores else 0))
        self.memory.update({"need": need, "query_gradients": sum(m.query for m in memory.values()),
                            "queries": queries, "query_batch": query_batch, "train_batch": train_batch,
                            "tokens": tokens, "grouped_partial_scores": partial,
                            "layers": {name: {"query": m.query, "working": m.working} for name, m in memory.items()}})
        if need <= self.memory_budget:
            partitions = [names]
        else:
            try:
                partitions = partition_layers(memory, self.memory_budget - partial)
            except ValueError as exc:
                layer = str(exc.args[0])
                alone = partition_need(memory, [layer])
                raise ConfigError(
                    f"{owner}: memory_budget {format_bytes(self.memory_budget)} cannot hold even one layer: "
                    f"'{layer}' alone needs {format_bytes(alone + partial)} (its query gradients "
                    f"{format_bytes(memory[layer].query)} = {queries} queries × {self.layers[layer].gradient_shape} "
                    + (f"at rank {self.query_gradient_rank} " if self.query_gradient_rank else "")
                    + f"× {stored} bytes, working memory of a batch {format_bytes(memory[layer].working)}"
                    + (f", the other layers' partial scores {format_bytes(partial)}" if partial else "")
                    + f"). Raise memory_budget to at least {format_bytes(alone + partial)}, store the query gradients "
                    f"narrower (query_dtype: bfloat16 or float16), cut them to low rank (query_gradient_rank), or use "
                    f"fewer queries or smaller batches; without layer groups the pass needs {format_bytes(need)}"
                ) from None
        largest = max(partition_need(memory, group) for group in partitions) + (partial if len(partitions) > 1 else 0)
        self.memory.update({"partitions": partitions, "largest": largest,
                            "partial_scores": partial if len(partitions) > 1 else 0})
        what = (f"the whole pass fits (one pass over {len(names)} layer(s))" if len(partitions) == 1 else
                f"{len(partitions)} layer groups of {'/'.join(str(len(g)) for g in partitions)} layers, each a pass "
                f"over the queries and the training data; the largest needs {format_bytes(largest)}")
        rank_zero_info(f"{owner}: memory_budget {format_bytes(self.memory_budget)}, need without groups "
                       f"{format_bytes(need)} (query gradients {format_bytes(self.memory['query_gradients'])}): {what}")
        return partitions

    # ------------------------------------------------------------------ the training data
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        if len(self._partitions) > 1:
            self._score_earlier_groups(trainer, pl_module)

    def _score_earlier_groups(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every group but the last, each over the predict loader read here; their scores are summed per row
        and the predict loop's batches add the last group's (the first group's queries are ready)."""
        owner = f"{type(self).__name__}[{self.name}]"
        loader = fresh_loader(current_loader(trainer))
        for number, names in enumerate(self._partitions[:-1]):
            if number > 0:
                self._compute_queries(trainer, pl_module, names)
            ids = ExampleIds(self._task, owner)
            for position, batch in enumerate(tqdm(iterate_batches(trainer, pl_module, loader), leave=False,
                                                  desc=f"{self.name}: layer group {number + 1}/{len(self._partitions)}",
                                                  disable=not show_progress(trainer))):
                if position == 0:
                    ids.check(loader, batch, trainer, "the predict pass", sharded=True)
                indices = ids(batch)
                if self._covered and set(indices.tolist()) <= self._covered:
                    continue
                check_context(self._task, batch, self._context, "the example")
                tensors = {key: value.cpu() for key, value in self._score(trainer, pl_module, batch).items()}
                for row, index in enumerate(indices.tolist()):
                    held = self._partial.get(index)
                    if held is not None and held["group"] == number:
                        continue  # a row read twice in one pass (a sampler's padding): counted once
                    values = {key: value[row] for key, value in tensors.items()}  # one copy per batch, above
                    if held is not None:
                        values = {key: _add_padded(held[key], value) for key, value in values.items()}
                    self._partial[index] = {**values, "group": number}
            if self._scores is not None:
                self._expanded.extend(self._scores.expanded)
        self._compute_queries(trainer, pl_module, self._partitions[-1])

    def _score(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        """The batch's scores over the layers whose query gradients are held now."""
        if self._scores is None:
            room = self.expand_low_rank_gb * 2**30
            if self.memory_budget is not None:  # expanded layers take only what the budget leaves
                room = max(0.0, min(room, self.memory_budget - self.memory["largest"]))
            self._scores = PairwiseScores(self.preconditioned, self.dtype, self.token_scores, room, self.scoring_dtype)
            self._scores.scoring_error = self.scoring_error  # one record over every layer group
        self._tracker.enabled = set(self.preconditioned)
        self._scores.begin_batch()
        try:
            self.backward(trainer, pl_module, batch, self._scores.add)
        finally:
            self._tracker.enabled = set(self.layers)
        if self.scoring_error.value > MAX_STORAGE_ERROR:
            raise ConfigError(f"{type(self).__name__}[{self.name}]: scoring_dtype bfloat16 changes the training "
                              f"examples' per-layer gradients by {self.scoring_error.value:.2%} (more than "
                              f"{MAX_STORAGE_ERROR:.0%}); set scoring_dtype null")
        return self._scores.end_batch()

    def score_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                    indices: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = self._score(trainer, pl_module, batch)
        if len(self._partitions) == 1:
            return tensors
        earlier = [self._partial.get(index) for index in indices.tolist()]
        if missing := [index for index, held in zip(indices.tolist(), earlier)
                       if (held is None or held["group"] != len(self._partitions) - 2) and index not in self._covered]:
            raise TrainingError(f"{type(self).__name__}[{self.name}]: the earlier layer groups did not score dataset "
                                f"indices {missing[:8]} of this batch; the predict loader must give the same rows each "
                                f"time it is read")
        out = {}
        for key, value in tensors.items():
            rows = [value[row] if held is None else _add_padded(value[row], held[key].to(value.device))
                    for row, held in enumerate(earlier)]  # rows an earlier run scored are left out by the caller
            width = max(row.shape[-1] for row in rows)
            out[key] = torch.stack([_pad(row, width) for row in rows])  # (B, Q) or (B, Q, T)
        return out

    def write(self, trainer: Trainer, folder: Path, indices: torch.Tensor, tensors: dict[str, torch.Tensor],
              texts: list[str], metadata: dict) -> None:
        scores = tensors["scores"].T.contiguous()  # (Q, N)
        out = {"scores": scores, "query_indices": self.query_indices, "train_indices": indices}
        if "token_scores" in tensors:
            out["token_scores"] = tensors["token_scores"].transpose(0, 1).contiguous()  # (Q, N, T)
        save_tensors(folder / "scores.safetensors", out, FORMAT)
        k = min(self.top_k, scores.shape[1])
        rows = []
        for q, query_index in enumerate(self.query_indices.tolist()):
            order = torch.argsort(scores[q], descending=True, stable=True)
            entry = lambda i: {"index": int(indices[i]), "score": float(scores[q, i]), "text": texts[i]}  # noqa: E731
            rows.append({"query_index": query_index, "query": self.query_texts[q],
                         "helpful": [entry(i) for i in order[:k].tolist()],
                         "harmful": [entry(i) for i in order.flip(0)[:k].tolist()]})
        write_jsonl(folder / "topk.jsonl", rows)
        memory = {**self.memory, "query_storage_error": self.storage_error,
                  **({"precondition_error": self.precondition_error.value} if self.precondition_dtype else {}),
                  **({"scoring_error": self.scoring_error.value} if self.scoring_dtype else {})}
        write_json(folder / "scores.json", {
            "format": FORMAT, **metadata, "num_queries": scores.shape[0], "num_train": scores.shape[1],
            "sign": "positive = the training example lowers the query's loss (helpful)", "memory": memory,
        })
        tensorboard_text(trainer, f"{self.name}/top_{k}", self._markdown(rows[:50], k))
        rank_zero_info(f"{type(self).__name__}[{self.name}]: scores of {scores.shape[0]} queries × {scores.shape[1]} "
                       f"training examples written to {folder}"
                       + (f" (query gradients stored in {memory['query_dtype']}: largest relative rounding error "
                          f"{self.storage_error:.2g})" if self.query_dtype != self.dtype else "")
                       + (f" (rotated back in {str(self.precondition_dtype).replace('torch.', '')}: largest relative "
                          f"error {self.precondition_error.value:.2g})" if self.precondition_dtype else "")
                       + (f" (training gradients in bfloat16: largest relative error {self.scoring_error.value:.2g})"
                          if self.scoring_dtype else ""))

    @staticmethod
    def _markdown(rows: list[dict], k: int) -> str:
        lines = ["| query | rank | helpful (score) | harmful (score) |", "|---|---|---|---|"]
        for row in rows:
            for rank, (good, bad) in enumerate(zip(row["helpful"], row["harmful"]), start=1):
                query = f"#{row['query_index']} {markdown_cell(row['query'])}" if rank == 1 else ""
                lines.append(f"| {query} | {rank} | #{good['index']} {markdown_cell(good['text'], 80)} ({good['score']:.3g}) "
                             f"| #{bad['index']} {markdown_cell(bad['text'], 80)} ({bad['score']:.3g}) |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ helpers
def _pad(value: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last axis of a row's token scores ``(Q, T)`` to ``width`` (sequence scores pass)."""
    if value.ndim < 2 or value.shape[-1] == width:
        return value
    return torch.nn.functional.pad(value, (0, width - value.shape[-1]))


def _add_padded(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Add two rows' scores whose token axes may differ by padding (padding tokens score zero)."""
    width = max(first.shape[-1], second.shape[-1]) if first.ndim > 1 else 0
    return _pad(first, width) + _pad(second, width) if width else first + second
