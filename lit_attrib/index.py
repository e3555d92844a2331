"""Query a gradient index: every training example's projected gradient was stored once (by
:class:`~lit_attrib.callbacks.GradientIndexCallback`); a query costs one forward/backward of the queries
and a streamed product with the stored rows, whatever the size of the training set.

``I(z_q, z_m) = (P ∇L(z_q))ᵀ (Ĥ + λI)⁻¹ (P ∇L(z_m))`` with ``Ĥ`` the K-FAC curvature fitted in the
projected space (or the identity). Preconditioning is applied to the query side only. **Positive = the
training example lowers the query's loss (helpful)**, as in every lit_attrib score.

Exact search streams the memory-mapped shards in blocks of rows (memory bounded by one block, whatever
the index's size). Approximate search (``approximate=True``, needs ``faiss-cpu``: ``pip install
'lit-attrib[faiss]'``) finds candidates with a FAISS inverted-file index over the rows reduced to their
top principal directions (built once, cached in ``<index>/approximate/``), then scores the candidates
exactly: the scores it returns are exact, only a row that is not among the candidates can be missed.

Example::

    index = GradientIndex("runs/quickstart/index")
    rows, ids = index.query_rows(module, query_loader)
    result = index.search(rows, k=10)          # result.ids (Q, 10), result.scores (Q, 10), best first
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lit_attrib.artifacts.index import METADATA_FILE, read_index, read_norms
from lit_attrib.callbacks._common import check_context, context_length, layers_checksum
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import Task, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ArtifactError, ConfigError, ModelError, TrainingError
from lit_attrib.io import atomic_path, write_json
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import default_damping, kfac_lambda
from lit_attrib.ops.projection import ProjectedGradients

__all__ = ["GradientIndex", "SearchResult", "projected_rows"]

Curvature = Literal["kfac", "identity"]
PROJECTION_ARGUMENTS = ("target_modules", "projection_dim", "seed")
"""The build arguments that fix the rows' projections: a query with others would be meaningless."""
BLOCK_BYTES = 8 << 20  # one streamed block of rows in the computation's dtype (fits a CPU's last-level cache)
CONVERT_BYTES = 4 << 20  # float16 rows are converted this many bytes at a time (stays in the last-level cache)
CHUNK_ROWS = 16384  # exact search: rows scored between two top-k merges
HALF_QUERIES = 8  # exact search of float16 rows: up to this many queries are each multiplied in float16
APPROXIMATE_FOLDER = "approximate"
FAISS_EXTRA = "pip install 'lit-attrib[faiss]'  (or: pip install faiss-cpu)"


def projected_rows(pl_module: nn.Module, batches: Iterable[Any], layers: dict, sizes: dict[str, tuple[int, int]],
                   seed: int, task: Task, dtype: torch.dtype = torch.float32, trainer: Any = None,
                   context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's projected gradient row and id over ``batches``: ``(rows (N, width), ids (N,))``.

    ``trainer`` gives the precision context of the forward (none outside Lightning); ``context`` is the
    model's longest input: a longer example is a :class:`~lit_attrib.errors.DataError`.
    """
    accumulator = ProjectedGradients(layers, sizes, seed, dtype, next(pl_module.parameters()).device, curvature=False)
    tracker = LayerTracker(layers, on_gradient=lambda layer, use, a, g: accumulator.add(layer, a, g)).attach()
    tracker.active = False
    rows, ids, seen = [], [], 0
    try:
        for batch in batches:
            check_context(task, batch, context, "a query")
            size = task.batch_size(batch)
            accumulator.begin_batch(size)
            losses = own_backward(trainer, pl_module, tracker, task, batch)
            block = accumulator.end_batch()
            known = task.example_ids(batch)
            batch_ids = known.cpu() if known is not None else torch.arange(seen, seen + size)
            if not (bool(torch.isfinite(losses).all()) and bool(torch.isfinite(block).all())):
                raise TrainingError(f"non-finite loss or gradient for the queries with ids {batch_ids.tolist()[:8]}; "
                                    f"check the model's weights and these examples")
            rows.append(block)
            ids.append(batch_ids)
            seen += size
    finally:
        tracker.detach()
    if not rows:
        raise ConfigError("the queries are empty: their loader gave no batches")
    return torch.cat(rows), torch.cat(ids)


@dataclass
class SearchResult:
    """Each query's most helpful (and most harmful) indexed examples, best first.

    ``ids``/``scores`` ``(Q, k)``: dataset ids and scores of the most helpful (highest scores);
    ``harmful_ids``/``harmful_scores`` the lowest scores, most harmful first. With ``per_layer``,
    ``layer_scores`` ``(Q, k, L)`` (and ``harmful_layer_scores``) split each score over :attr:`layers`
    (they sum to it). ``seconds`` is the wall-clock time of the search (preconditioning included).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    harmful_ids: torch.Tensor | None
    harmful_scores: torch.Tensor | None
    layers: list[str]
    layer_scores: torch.Tensor | None = None
    harmful_layer_scores: torch.Tensor | None = None
    method: str = "exact"
    seconds: float = 0.0


class GradientIndex:
    """A built gradient index, opened for queries.

    Args:
        folder: the index folder (``index.json`` and its shards).

    Raises:
        ArtifactError: no complete index, an empty one, or a damaged shard.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.metadata, self._shards, ids, self._curvature = read_index(folder)
        self.ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        self.layers: dict[str, dict] = self.metadata["layers"]
        self.sizes = {name: (info["k_out"], info["k_in"]) for name, info in self.layers.items()}
        self.width = int(self.metadata["width"])
        self.storage_dtype = str(self.metadata.get("storage_dtype", self._shards[0].dtype))
        # float16 rows are scored in float32 (their 11-bit mantissas need no more); float64 rows in float64
        self.compute_dtype = torch.float64 if self._shards[0].dtype == np.float64 else torch.float32
        self._starts = np.cumsum([0] + [len(shard) for shard in self._shards])  # each shard's first position
        self._norms = read_norms(self.folder, self.metadata, self._shards)  # None: an index written without them
        self._max_norm = max(float(n.max(initial=0.0)) for n in self._norms) if self._norms is not None else 0.0
        self._approximate: dict[str, _Approximate] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    # -------------------------------------------------------------------------------- checks
    def check_arguments(self, arguments: dict) -> None:
        """Refuse build ``arguments`` (a ``GradientIndexCallback``'s) whose projections differ from the index's.

        Raises:
            ArtifactError: naming each differing argument with both values.
        """
        saved = self.metadata.get("arguments", {})
        differing = [f"{key}: index {saved.get(key)!r}, given {arguments.get(key)!r}" for key in PROJECTION_ARGUMENTS
                     if key in arguments and key in saved and _plain(arguments[key]) != _plain(saved[key])]
        if differing:
            raise ArtifactError(f"the index in '{self.folder}' was built with other projections than those given ("
                                + "; ".join(differing) + "): query it with the arguments it was built with, or "
                                "build an index with these")

    def check_model(self, pl_module: nn.Module, check_weights: bool = True) -> dict[str, LayerInfo]:
        """The module's layers the index was built on; refuses other layers, shapes, or (``check_weights``)
        other weights than those the index recorded.

        Raises:
            ArtifactError: saying what differs.
        """
        built = {n: tuple(i["gradient_shape"]) for n, i in self.layers.items()}
        try:
            layers = find_layers(pl_module, list(self.layers))
        except ModelError:
            layers = {}
        found = {n: layer.gradient_shape for n, layer in layers.items()}
        if found != built:
            missing = [n for n in built if n not in found]
            shapes = [f"{n} {found[n]} vs {built[n]}" for n in built if n in found and found[n] != built[n]]
            differences = [f"missing {missing[:6]}" if missing else "",
                           f"gradient shapes differ (model vs index): {shapes[:4]}" if shapes else ""]
            raise ArtifactError(
                f"the index in '{self.folder}' was built on other layers than this model's ("
                + "; ".join(part for part in differences if part)
                + f"); it holds {len(built)} layers such as {list(built)[:3]}: query it with the model it was built on")
        saved = self.metadata.get("weights")
        if check_weights and saved is not None:
            now = layers_checksum(layers)
            if now != saved:
                raise ArtifactError(
                    f"the index in '{self.folder}' was built at other weights of these layers (checksum {saved}, "
                    f"global step {self.metadata.get('global_step')}) than the model's ({now}): load the checkpoint "
                    f"it was built at (--ckpt_path), or pass check_weights=False to score queries of other weights "
                    f"on purpose")
        return layers

    # ------------------------------------------------------------------------------ queries
    def query_rows(self, pl_module: nn.Module, batches: Iterable[Any], task: Task | None = None,
                   dtype: torch.dtype = torch.float64, trainer: Any = None,
                   check_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' projected gradients with the index's projections: ``(rows (Q, width), ids (Q,))``.

        ``batches`` on the module's device; ``trainer`` (optional) gives the precision context.

        Raises:
            ArtifactError: the module's layers or weights are not those the index was built on.
            DataError: a query longer than the model's context.
        """
        layers = self.check_model(pl_module, check_weights)
        task = resolve_task(pl_module, task, owner="GradientIndex")
        return projected_rows(pl_module, batches, layers, self.sizes, self.metadata["seed"], task, dtype,
                              trainer=trainer, context=context_length(pl_module))

    def precondition(self, rows: torch.Tensor, curvature: Curvature = "kfac",
                     damping: float | None = None) -> torch.Tensor:
        """``(Ĥ + λI)⁻¹`` applied to query rows ``(Q, width)``, layer block by layer block; ``λ`` defaults to
        ``0.1 · mean(λ_i μ_j)`` per layer, as for the unprojected factors."""
        if curvature not in ("kfac", "identity"):
            raise ConfigError(f"curvature must be 'kfac' or 'identity'; got {curvature!r}")
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ArtifactError(f"query rows of shape {tuple(rows.shape)}, but the index in '{self.folder}' holds rows "
                                f"of width {self.width}: they were projected for another index (compute them with "
                                f"this index's query_rows)")
        if not bool(torch.isfinite(rows).all()):
            raise TrainingError("the query rows hold non-finite values")
        if curvature == "identity":
            return rows
        if not self._curvature:
            raise ArtifactError(f"the index in '{self.folder}' holds no curvature (built with curvature: false); "
                                f"query with curvature='identity'")
        out, start = [], 0
        for name, (k_out, k_in) in self.sizes.items():
            block = rows[:, start:start + k_out * k_in].reshape(-1, k_out, k_in).double()  # (Q, k_out, k_in)
            start += k_out * k_in
            values_a = self._curvature[f"{name}.activation_eigenvalues"]
            vectors_a = self._curvature[f"{name}.activation_eigenvectors"]
            values_g = self._curvature[f"{name}.gradient_eigenvalues"]
            vectors_g = self._curvature[f"{name}.gradient_eigenvectors"]
            eigen = kfac_lambda(values_a, values_g)  # (k_out, k_in)
            denominator = eigen + (default_damping(eigen) if damping is None else damping)
            rotated = vectors_g.T @ block @ vectors_a
            out.append((vectors_g @ (rotated / denominator) @ vectors_a.T).flatten(1))
        return torch.cat(out, dim=1).to(rows.dtype)

    def scores(self, query_rows: torch.Tensor, curvature: Curvature = "kfac", damping: float | None = None,
               block_rows: int | None = None, per_layer: bool = False) -> torch.Tensor:
        """``scores (Q, N)`` of every query against every indexed example, columns in :attr:`ids` order
        (dataset index order), streamed over the memory-mapped shards ``block_rows`` rows at a time; with
        ``per_layer``, ``(Q, N, L)`` split over :attr:`layer_names`."""
        query = self.precondition(query_rows, curvature, damping).to(self.compute_dtype)
        if not per_layer:
            return torch.cat([scores for _, scores in self._chunk_scores(query, block_rows)], dim=1).double()
        parts = [torch.stack([self._checked(query[:, span] @ block[:, span].T, start) for span in self._spans()],
                             dim=-1) for start, block in self._blocks(block_rows)]  # (Q, b, L) each
        return torch.cat(parts, dim=1).double()

    def topk(self, query_rows: torch.Tensor, k: int = 10, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's ``k`` most helpful examples: ``(scores (Q, k), dataset ids (Q, k))``."""
        result = self.search(query_rows, k, harmful=False, **kwargs)
        return result.scores, result.ids

    def search(self, query_rows: torch.Tensor, k: int = 10, curvature: Curvature = "kfac",
               damping: float | None = None, harmful: bool = True, per_layer: bool = False,
               approximate: bool = False, nprobe: int = 64, candidates: int | None = None,
               block_rows: int | None = None) -> SearchResult:
        """Each query's ``k`` most helpful (and, with ``harmful``, most harmful) indexed examples.

        Exact search keeps a running top-k over the streamed rows, ``block_rows`` at a time (default 16384:
        the scores of one block are held). ``approximate`` searches the FAISS index
        of :meth:`approximate_index` (built and cached on first use) for ``candidates`` rows per query (default
        ``max(20 k, 200)``, over ``nprobe`` of its lists) and scores those exactly.

        Raises:
            ConfigError: ``k`` below 1, or ``approximate`` without FAISS installed.
            ArtifactError: query rows of another index, or a shard whose rows are not finite (damaged).
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1; got {k}")
        started = time.perf_counter()
        query = self.precondition(query_rows, curvature, damping).to(self.compute_dtype)
        k = min(k, len(self))
        if approximate:
            count = min(len(self), candidates or max(20 * k, 200))
            index = self.approximate_index()
            best = self._rerank(query, index.search(query, count, nprobe), k, largest=True)
            worst = self._rerank(query, index.search(-query, count, nprobe), k, largest=False) if harmful else None
            short = ~torch.isfinite(best[0]).all(1) | (~torch.isfinite(worst[0]).all(1) if worst else False)
            if bool(short.any()):  # fewer than k candidates in the lists visited: those queries search exactly
                exact_best, exact_worst = self._exact(query[short], k, harmful, block_rows)
                best[0][short], best[1][short] = exact_best
                if worst:
                    worst[0][short], worst[1][short] = exact_worst
        else:
            best, worst = self._exact(query, k, harmful, block_rows)
        result = SearchResult(ids=self.ids[best[1]], scores=best[0].double(),
                              harmful_ids=self.ids[worst[1]] if worst else None,
                              harmful_scores=worst[0].double() if worst else None,
                              layers=self.layer_names, method="faiss" if approximate else "exact")
        if per_layer:
            result.layer_scores = self.layer_scores(query, best[1])
            result.harmful_layer_scores = self.layer_scores(query, worst[1]) if worst else None
        result.seconds = time.perf_counter() - started
        return result

    def layer_scores(self, preconditioned: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(Q, k, L)``: each layer's share of the scores of preconditioned queries ``(Q, width)`` against the
        rows at ``positions (Q, k)`` (positions in :attr:`ids`)."""
        rows = self.rows(positions.flatten()).reshape(*positions.shape, self.width)  # (Q, k, width)
        return self._layer_products(preconditioned.to(self.compute_dtype)[:, None, :], rows).double()

    def rows(self, positions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The stored rows at ``positions`` (in :attr:`ids` order), ``(n, width)`` in the computation's dtype."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = torch.empty(len(positions), self.width, dtype=self.compute_dtype)
        shard_of = np.searchsorted(self._starts, positions, side="right") - 1
        for s in np.unique(shard_of):
            chosen = np.nonzero(shard_of == s)[0]
            local = positions[chosen] - self._starts[s]
            order = np.argsort(local)  # read the memory map forwards
            block = torch.from_numpy(np.asarray(self._shards[s][local[order]]))
            out[torch.from_numpy(chosen[order])] = block.to(self.compute_dtype)
        return out

    # ------------------------------------------------------------------------ approximate
    def approximate_index(self, dim: int = 256, lists: int | None = None, basis_rows: int = 16384,
                          seed: int = 0, rebuild: bool = False) -> _Approximate:
        """The FAISS index of the rows for approximate search, built once and cached in
        ``<index>/approximate/`` (rebuilt when the index changes).

        Rows are reduced to their top ``dim`` principal directions (of the uncentred second moment, which
        keeps inner products), estimated from ``basis_rows`` sampled rows; an inverted file of ``lists``
        cells (default ``≈ sqrt(N)``, trained on ``64 · lists`` sampled rows) over the reduced rows answers
        inner-product searches. Building reads every row once.

        Raises:
            ConfigError: FAISS is not installed (the ``faiss`` extra).
        """
        faiss = _faiss()
        size = len(self)
        dim = max(1, min(dim, self.width, size))
        lists = lists or max(1, min(round(math.sqrt(size)), size // 39))
        spec = {"dim": dim, "lists": lists, "basis_rows": basis_rows, "seed": seed,
                "index": hashlib.sha256((self.folder / METADATA_FILE).read_bytes()).hexdigest()[:16]}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        if key in self._approximate and not rebuild:
            return self._approximate[key]
        folder = self.folder / APPROXIMATE_FOLDER
        files = {name: folder / f"ivf-{key}{suffix}" for name, suffix in
                 (("faiss", ".faiss"), ("basis", ".npy"), ("meta", ".json"))}
        if not rebuild and all(path.is_file() for path in files.values()):
            approximate = _Approximate(faiss.read_index(str(files["faiss"])), torch.from_numpy(np.load(files["basis"])))
        else:
            approximate = self._build_approximate(faiss, spec)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(files["faiss"]) as tmp:
                faiss.write_index(approximate.index, str(tmp))
            with atomic_path(files["basis"]) as tmp, open(tmp, "wb") as handle:
                np.save(handle, approximate.basis.numpy())
            write_json(files["meta"], {**spec, "rows": size, "width": self.width})  # last: vouches for the others
        self._approximate[key] = approximate
        return approximate

    def _build_approximate(self, faiss: Any, spec: dict) -> _Approximate:
        size, dim, lists = len(self), spec["dim"], spec["lists"]
        generator = np.random.default_rng(spec["seed"])
        sample = generator.choice(size, size=min(size, max(spec["basis_rows"], 64 * lists)), replace=False)
        rows = self.rows(np.sort(sample)).float()  # (S, width)
        fit = rows[torch.from_numpy(generator.permutation(len(rows))[:spec["basis_rows"]])]  # a random subset
        # top right singular vectors of the sample, uncentred: q·x ≈ (Vᵀq)·(Vᵀx) where the rows live
        if dim >= min(fit.shape) - 8:
            basis = torch.linalg.svd(fit, full_matrices=False)[2][:dim].T
        else:
            torch.manual_seed(spec["seed"])
            basis = torch.svd_lowrank(fit, q=dim + 8, niter=2)[2][:, :dim]
        basis = basis.contiguous()  # (width, dim)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec["seed"]
        index.train(np.ascontiguousarray((rows @ basis).numpy(), dtype=np.float32))
        for _, block in self._blocks(None):
            index.add(np.ascontiguousarray((block.float() @ basis).numpy(), dtype=np.float32))
        return _Approximate(index, basis)

    # ---------------------------------------------------------------------------- helpers
    def _blocks(self, block_rows: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first position, rows (b, width))`` over every shard in the computation's dtype; a float16
        block is converted into one buffer reused for every block."""
        rows = block_rows or max(1, BLOCK_BYTES // (self.width * torch.finfo(self.compute_dtype).bits // 8))
        buffer = None
        for shard, first in zip(self._shards, self._starts):
            for start in range(0, len(shard), rows):
                with warnings.catch_warnings():  # the memory map is read-only, and only read
                    warnings.simplefilter("ignore", UserWarning)
                    stored = torch.from_numpy(shard[start:start + rows])
                if stored.dtype == self.compute_dtype:
                    yield int(first) + start, stored
                    continue
                if buffer is None:
                    buffer = torch.empty(rows, self.width, dtype=self.compute_dtype)
                block = buffer[:len(stored)]
                block.copy_(stored)
                yield int(first) + start, block

    def _checked(self, scores: torch.Tensor, start: int) -> torch.Tensor:
        """``scores (Q, b)`` of the block at ``start``, refused if a stored row is not finite (the query
        rows were checked: a non-finite score comes from the shard)."""
        if not bool(torch.isfinite(scores).all()):
            column = int((~torch.isfinite(scores)).any(0).nonzero()[0])
            position = start + column
            shard = int(np.searchsorted(self._starts, position, side="right") - 1)
            names = self.metadata["shards"][shard] if shard < len(self.metadata.get("shards", [])) else ["?"]
            raise ArtifactError(f"row {position - self._starts[shard]} (dataset id {int(self.ids[position])}) of shard "
                                f"'{self.folder / names[0]}' holds non-finite values: the index is damaged; build "
                                f"it again")
        return scores

    def _chunk_scores(self, query: torch.Tensor, chunk_rows: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first position, scores (Q, c))`` of ``query`` against ``chunk_rows`` rows at a time. Float16 rows
        are converted a core's cache-full at a time, each piece multiplied while it is still in the cache: one
        pass over the memory map (the conversion is the pass's cost beyond reading the bytes)."""
        chunk_rows = chunk_rows or CHUNK_ROWS
        transposed = query.T.contiguous()  # (width, Q)
        piece = max(1, CONVERT_BYTES // (self.width * torch.finfo(self.compute_dtype).bits // 8))
        buffer = torch.empty(piece, self.width, dtype=self.compute_dtype)
        for shard, first in zip(self._shards, self._starts):
            with warnings.catch_warnings():  # the memory map is read-only, and only read
                warnings.simplefilter("ignore", UserWarning)
                stored = torch.from_numpy(shard)  # (n, width), memory-mapped: nothing is read yet
            for start in range(0, len(stored), chunk_rows):
                stop = min(len(stored), start + chunk_rows)
                scores = torch.empty(stop - start, query.shape[0], dtype=self.compute_dtype)  # (c, Q)
                if stored.dtype == self.compute_dtype:
                    torch.mm(stored[start:stop], transposed, out=scores)
                else:
                    for low in range(start, stop, piece):
                        high = min(stop, low + piece)
                        block = buffer[:high - low]
                        block.copy_(stored[low:high])
                        torch.mm(block, transposed, out=scores[low - start:high - start])
                yield int(first) + start, self._checked(scores.T, int(first) + start)

    def _exact(self, query: torch.Tensor, k: int, harmful: bool, block_rows: int | None) -> tuple[tuple, tuple | None]:
        """Running top-k (and bottom-k) of ``query @ rowsᵀ`` over the streamed chunks: ``(scores, positions)``.
        A few queries of float16 rows whose norms are stored search in float16 (:meth:`_exact_half`)."""
        count = query.shape[0]
        if self._norms is not None and self._shards[0].dtype == np.float16 and 0 < count <= HALF_QUERIES:
            found = [self._exact_half(row, k, harmful, block_rows) for row in query]
            if all(f is not None for f in found):
                best = tuple(torch.stack(parts) for parts in zip(*(f[0] for f in found)))
                worst = tuple(torch.stack(parts) for parts in zip(*(f[1] for f in found))) if harmful else None
                return best, worst
        empty = (query.new_empty(count, 0), torch.empty(count, 0, dtype=torch.long))
        best, worst = empty, empty
        for start, scores in self._chunk_scores(query, block_rows):
            positions = torch.arange(start, start + scores.shape[1]).expand(count, -1)
            best = _merge(best, scores, positions, k, largest=True)
            if harmful:
                worst = _merge(worst, scores, positions, k, largest=False)
        return _ordered(*best, largest=True), _ordered(*worst, largest=False) if harmful else None

    def _exact_half(self, query: torch.Tensor, k: int, harmful: bool, chunk_rows: int | None) -> tuple | None:
        """The exact top-k (and bottom-k) of one query ``(width,)`` over float16 rows, at memory speed: each
        chunk is multiplied in float16 by a fused kernel (``torch.mv``: float16 in, float32 sums, no converted
        copy of the rows), which bounds every row's error by its stored norm; the rows whose bounds reach
        the k-th best lower bound are the only ones that can be in the top k, and they are scored again in
        float32. ``((scores (k,), positions (k,)), bottom or None)``; ``None`` for a query of zeros.

        The bound: the query is scaled by a power of two (exact) so that no score can leave float16's range,
        and rounded to float16 (error ≤ u₁₆ |q_i| + η per entry, η half the smallest subnormal); the sums
        are in float32 (≤ w u₃₂ Σ |r_i q_i|); the score is rounded to float16 (≤ u₁₆ |score| + η). With
        ``Σ |r_i q_i| ≤ ‖r‖ ‖q‖`` every term is known, and it is doubled for safety.
        """
        norm, largest_entry = float(torch.linalg.vector_norm(query.double())), float(query.abs().max())
        if norm == 0 or self._max_norm == 0:
            return None
        scale = 2.0 ** math.floor(math.log2(min(2.0 ** 14 / (self._max_norm * norm), 2.0 ** 14 / largest_entry)))
        half = (query.double() * scale).half()
        width, u16, u32, eta = self.width, 2.0 ** -11, 2.0 ** -24, 2.0 ** -25
        per_norm = 2 * (norm * scale * (u16 + 1.01 * width * u32 * (1 + u16)) + eta * math.sqrt(width) * 1.01)
        chunk_rows = chunk_rows or CHUNK_ROWS
        bounds = {True: torch.empty(0), False: torch.empty(0)}  # the k best lower (and k worst upper) bounds
        kept: dict[bool, list[torch.Tensor]] = {True: [], False: []}  # candidate positions and bounds
        for shard, first, norms in zip(self._shards, self._starts, self._norms):
            with warnings.catch_warnings():  # the memory map is read-only, and only read
                warnings.simplefilter("ignore", UserWarning)
                stored, norms = torch.from_numpy(shard), torch.from_numpy(norms)
            for start in range(0, len(stored), chunk_rows):
                stop = min(len(stored), start + chunk_rows)
                approximate = self._checked(torch.mv(stored[start:stop], half).float()[None], int(first) + start)[0]
                error = 2 * u16 * approximate.abs() + norms[start:stop] * per_norm + 4 * eta
                positions = torch.arange(int(first) + start, int(first) + stop)
                for largest in (True, False) if harmful else (True,):
                    sign = 1.0 if largest else -1.0  # the bottom k of the scores is the top k of their negatives
                    low, high = sign * approximate - error, sign * approximate + error
                    bounds[largest] = torch.cat([bounds[largest], low]).topk(min(k, len(bounds[largest]) + len(low))).values
                    threshold = bounds[largest][-1] if len(bounds[largest]) == k else -math.inf
                    chosen = high >= threshold
                    kept[largest].append(torch.stack([positions[chosen].double(), high[chosen].double()]))
        out = []
        for largest in (True, False) if harmful else (True,):
            candidates = torch.cat(kept[largest], dim=1)
            candidates = candidates[:, candidates[1] >= float(bounds[largest][-1])][0].long().numpy()
            scores, positions = self._rerank(query[None].to(self.compute_dtype), candidates[None], k, largest)
            out.append((scores[0], positions[0]))
        return out[0], out[1] if harmful else None

    def _rerank(self, query: torch.Tensor, found: np.ndarray, k: int, largest: bool) -> tuple:
        """Exact scores of each query's FAISS candidates ``found (Q, C)`` (``-1``: none); the top (or bottom) k."""
        unique = np.unique(found[found >= 0])
        if len(unique) == 0:
            return (query.new_full((len(query), k), -math.inf if largest else math.inf),
                    torch.zeros(len(query), k, dtype=torch.long))
        rows = self.rows(unique)  # (U, width)
        exact = query @ rows.T  # (Q, U)
        slots = torch.from_numpy(np.searchsorted(unique, np.maximum(found, 0)))
        scores = exact.gather(1, slots)
        scores[torch.from_numpy(found < 0)] = -math.inf if largest else math.inf
        positions = torch.from_numpy(np.where(found >= 0, found, 0)).long()
        return _ordered(*_merge((scores[:, :0], positions[:, :0]), scores, positions, k, largest), largest=largest)

    def _spans(self) -> list[slice]:
        """Each layer's columns of a row, in :attr:`layer_names` order."""
        ends = np.cumsum([0] + [k_out * k_in for k_out, k_in in self.sizes.values()])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(ends)]

    def _layer_products(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(…, L)``: each layer block's ``query · row`` (broadcast over the leading axes)."""
        return torch.stack([(query[..., span] * rows[..., span]).sum(-1) for span in self._spans()], dim=-1)


@dataclass
class _Approximate:
    """A FAISS inverted-file index over rows reduced by ``basis (width, dim)``."""

    index: Any
    basis: torch.Tensor

    def search(self, query: torch.Tensor, count: int, nprobe: int) -> np.ndarray:
        """Positions ``(Q, count)`` of the rows with the largest reduced inner products (``-1``: none)."""
        self.index.nprobe = max(1, min(nprobe, self.index.nlist))
        reduced = np.ascontiguousarray((query.float() @ self.basis.float()).numpy(), dtype=np.float32)
        return self.index.search(reduced, count)[1]


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"approximate search needs FAISS, which is not installed: {FAISS_EXTRA}") from None
    return faiss


def _merge(held: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, positions: torch.Tensor, k: int,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top (or bottom) ``k`` of held ``(scores, positions)`` and a new block's, per query."""
    values = torch.cat([held[0], scores], dim=1)
    where = torch.cat([held[1], positions], dim=1)
    top = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
    return top.values, where.gather(1, top.indices)


def _ordered(scores: torch.Tensor, positions: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Best first, ties in ``InfluenceCallback``'s order (helpful: lower position first; harmful: higher)."""
    key_score = (-scores if largest else scores).double().numpy()
    key_position = (positions if largest else -positions).numpy()
    order = torch.from_numpy(np.lexsort((key_position, key_score), axis=1).copy()) if scores.numel() else \
        torch.empty_like(positions)
    return scores.gather(1, order), positions.gather(1, order)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
