"""The SDI artifact (``sdi.safetensors``, ``topk.jsonl``, ``sdi.json``) and the checksums its sketch cache keys on.

``sdi.safetensors`` holds ``tracin (N_train, N_query)``, ``sdi (N_train, N_query, S)`` (``sdi`` mode),
``train_indices``, ``query_indices`` and, for checkpoint mode, ``eta (C,)``; rows and columns in dataset
index order. ``topk.jsonl`` lists each query's most helpful and harmful training examples with their
per-step trajectories; ``sdi.json`` (written last) the steps, checkpoints and sketch layout.
"""

from __future__ import annotations

import os

import torch

from lit_attrib.artifacts.scores import save_tensors
from lit_attrib.io import write_jsonl

__all__ = ["FORMAT", "save_sdi", "step_shares"]

FORMAT = "lit_attrib.sdi/1"


def save_sdi(folder: str | os.PathLike, sdi: torch.Tensor, train_indices: torch.Tensor, query_indices: torch.Tensor,
             keep_steps: bool, eta: list[float] | None, top_k: int) -> None:
    """Write ``sdi.safetensors`` and ``topk.jsonl`` from ``sdi (N_train, N_query, S)`` (S = 1 in tracin mode)."""
    tracin = sdi.sum(-1)
    tensors = {"tracin": tracin, "train_indices": train_indices, "query_indices": query_indices}
    if keep_steps:
        tensors["sdi"] = sdi
    if eta:
        tensors["eta"] = torch.tensor(eta, dtype=torch.float64)
    save_tensors(os.path.join(folder, "sdi.safetensors"), tensors, FORMAT)
    rows = []
    for j, query in enumerate(query_indices.tolist()):
        order = torch.argsort(tracin[:, j], descending=True)
        k = min(top_k, len(order))

        def listed(positions: torch.Tensor) -> list[dict]:
            return [{"train_index": int(train_indices[p]), "tracin": float(tracin[p, j]),
                     "steps": [round(float(v), 8) for v in sdi[p, j]]} for p in positions.tolist()]

        rows.append({"query_index": query, "helpful": listed(order[:k]), "harmful": listed(order.flip(0)[:k])})
    write_jsonl(os.path.join(folder, "topk.jsonl"), rows)


def step_shares(sdi: torch.Tensor) -> list[float]:
    """Each step's share of all |influence|: ``Σ_ij |sdi[i, j, s]|`` normalised."""
    share = sdi.abs().sum((0, 1))
    return (share / share.sum().clamp(min=1e-300)).tolist()
