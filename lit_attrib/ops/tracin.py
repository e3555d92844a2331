"""TracIn and step-decomposed influence from per-example gradient features (sketches or exact).

``TracIn(z_i, z'_j) = Σ_c η_c ⟨∇L(z_i; θ_c), ∇L(z'_j; θ_c)⟩``; with the query's gradient split by
step, ``SDI[i, j, s] = Σ_c η_c ⟨∇L(z_i), ∇^{(s)}L(z'_j)⟩`` and SDI summed over ``s`` is TracIn.
"""

from __future__ import annotations

import torch

__all__ = ["TracInRows", "sum_by_index"]


def sum_by_index(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with equal indices added together: ``(unique indices, summed rows)`` in index order."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    return unique, rows.new_zeros(len(unique), *rows.shape[1:]).index_add_(0, inverse, rows)


class TracInRows:
    """Each training example's ``Σ_c η_c ⟨train_i, query_{j,s}⟩``, summed by dataset index.

    :meth:`set_queries` fixes the current query features ``(N_q, S', size)`` (``S' = 1`` for TracIn
    only); :meth:`add` contracts a batch of training features ``(B, size)`` with them, weighted by
    ``η``; :meth:`rows` sums what was added by dataset index. Examples seen several times (epochs,
    checkpoints) add up. Records are kept on the CPU and folded every ``fold_every`` batches.

    Args:
        dtype: dtype of the rows.
        fold_every: batches between foldings of the records (memory against time).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, fold_every: int = 256) -> None:
        self.dtype = dtype
        self.fold_every = fold_every
        self.queries: torch.Tensor | None = None
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_queries(self, queries: torch.Tensor | None) -> None:
        self.queries = queries

    def contract(self, train: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight · ⟨train_i, query_{j,s}⟩``: ``(B, N_q, S')``."""
        flat = self.queries.flatten(0, 1)  # (N_q·S', size)
        return (weight * (train.to(flat.dtype) @ flat.T)).view(train.shape[0], *self.queries.shape[:2])

    def add(self, indices: torch.Tensor, train: torch.Tensor, weight: float) -> None:
        """Add ``weight · ⟨train_i, query⟩`` for the examples ``indices`` (``train (B, size)``)."""
        self._records.append((indices.cpu(), self.contract(train, weight).detach().cpu()))
        if len(self._records) >= self.fold_every:
            self._records = [self.rows()]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What was added, summed by dataset index: ``(indices, rows (N, N_q, S'))`` in index order."""
        if not self._records:
            width = self.queries.shape[:2] if self.queries is not None else (0, 1)
            return torch.empty(0, dtype=torch.long), torch.empty(0, *width, dtype=self.dtype)
        return sum_by_index(torch.cat([r[0] for r in self._records]), torch.cat([r[1] for r in self._records]))

    def clear(self) -> None:
        self._records = []

    def state_dict(self) -> dict:
        if not self._records:
            return {}
        indices, rows = self.rows()
        return {"indices": indices, "rows": rows}

    def load_state_dict(self, state: dict) -> None:
        self._records = [(state["indices"], state["rows"])] if state else []
