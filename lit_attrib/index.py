"""Query a gradient index: every training example's projected gradient was stored once (by
:class:`~lit_attrib.callbacks.GradientIndexCallback`); a query costs one forward/backward of the queries
and a streamed product with the stored rows, whatever the size of the training set.

``I(z_q, z_m) = (P ∇L(z_q))ᵀ (Ĥ + λI)⁻¹ (P ∇L(z_m))`` with ``Ĥ`` the K-FAC curvature fitted in the
projected space (or the identity). Preconditioning is applied to the query side only. **Positive = the
training example lowers the query's loss (helpful)**, as in every lit_attrib score.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lit_attrib.artifacts.index import read_index
from lit_attrib.engine.gradient_pass import own_backward
from lit_attrib.engine.task import Task, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers
from lit_attrib.errors import ArtifactError
from lit_attrib.ops.kfac import default_damping, kfac_lambda
from lit_attrib.ops.projection import ProjectedGradients

__all__ = ["GradientIndex", "projected_rows"]


def projected_rows(pl_module: nn.Module, batches: Iterable[Any], layers: dict, sizes: dict[str, tuple[int, int]],
                   seed: int, task: Task, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's projected gradient row and id over ``batches``: ``(rows (N, width), ids (N,))``."""
    accumulator = ProjectedGradients(layers, sizes, seed, dtype, next(pl_module.parameters()).device, curvature=False)
    tracker = LayerTracker(layers, on_gradient=lambda layer, use, a, g: accumulator.add(layer, a, g)).attach()
    tracker.active = False
    rows, ids, seen = [], [], 0
    try:
        for batch in batches:
            size = task.batch_size(batch)
            accumulator.begin_batch(size)
            own_backward(None, pl_module, tracker, task, batch)
            rows.append(accumulator.end_batch())
            known = task.example_ids(batch)
            ids.append(known if known is not None else torch.arange(seen, seen + size))
            seen += size
    finally:
        tracker.detach()
    return torch.cat(rows), torch.cat(ids)


class GradientIndex:
    """A built gradient index, opened for queries.

    Args:
        folder: the index folder (``index.json`` and its shards).

    Raises:
        ArtifactError: no complete index, or a damaged shard.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = folder
        self.metadata, self._shards, ids, self._curvature = read_index(folder)
        self.ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        self.layers: dict[str, dict] = self.metadata["layers"]
        self.sizes = {name: (info["k_out"], info["k_in"]) for name, info in self.layers.items()}

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------------------ queries
    def query_rows(self, pl_module: nn.Module, batches: Iterable[Any], task: Task | None = None,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' projected gradients with the index's projections: ``(rows (Q, width), ids (Q,))``.

        Raises:
            ArtifactError: the module's layers are not those the index was built on.
        """
        layers = find_layers(pl_module, list(self.layers))
        if list(layers) != list(self.layers) or any(
                layers[n].gradient_shape != tuple(self.layers[n]["gradient_shape"]) for n in layers):
            raise ArtifactError(f"the index in '{self.folder}' was built on other layers: it holds "
                                f"{ {n: i['gradient_shape'] for n, i in self.layers.items()} }; query it with the "
                                f"model it was built on")
        task = resolve_task(pl_module, task, owner="GradientIndex")
        return projected_rows(pl_module, batches, layers, self.sizes, self.metadata["seed"], task, dtype)

    def precondition(self, rows: torch.Tensor, curvature: Literal["kfac", "identity"] = "kfac",
                     damping: float | None = None) -> torch.Tensor:
        """``(Ĥ + λI)⁻¹`` applied to query rows ``(Q, width)``, layer block by layer block; ``λ`` defaults to
        ``0.1 · mean(λ_i μ_j)`` per layer, as for the unprojected factors."""
        if curvature == "identity":
            return rows
        if not self._curvature:
            raise ArtifactError(f"the index in '{self.folder}' holds no curvature (built with curvature: false); "
                                f"query with curvature='identity'")
        out, start = [], 0
        for name, (k_out, k_in) in self.sizes.items():
            block = rows[:, start:start + k_out * k_in].reshape(-1, k_out, k_in).double()
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

    def scores(self, query_rows: torch.Tensor, curvature: Literal["kfac", "identity"] = "kfac",
               damping: float | None = None, block_rows: int = 65536) -> torch.Tensor:
        """``scores (Q, N)`` of every query against every indexed example, columns in :attr:`ids` order,
        streamed over the memory-mapped shards ``block_rows`` rows at a time."""
        preconditioned = self.precondition(query_rows, curvature, damping)
        parts = []
        for shard in self._shards:
            for start in range(0, shard.shape[0], block_rows):
                block = torch.from_numpy(np.asarray(shard[start:start + block_rows]))
                parts.append(preconditioned @ block.to(preconditioned.dtype).T)
        return torch.cat(parts, dim=1)

    def topk(self, query_rows: torch.Tensor, k: int = 10, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's ``k`` most helpful examples: ``(scores (Q, k), dataset ids (Q, k))``."""
        scores = self.scores(query_rows, **kwargs)
        values, positions = scores.topk(min(k, scores.shape[1]), dim=1)
        return values, self.ids[positions]
