"""Attention maps of Llama-family layers, plain and differential, and where their mass goes.

- :func:`attention_probabilities` recomputes ``softmax(Q Kᵀ · scaling + mask)`` for chosen heads and
  query positions from the tensors an attention kernel received, for kernels (SDPA, flash) that
  return no weights. Only the selection is ever materialised.
- :func:`differential_lambda` and :func:`differential_map` give DiffLlama's map
  ``D = A₁ − λ·A₂`` (Ye et al. 2024, https://arxiv.org/abs/2410.05258), with
  ``λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init``. In transformers' DiffLlama, query head ``i`` pairs
  with head ``i + H/2``, and both heads of a pair read the same values (the two halves of the
  key-value heads, concatenated). Rows of ``D`` sum to ``1 − λ``; nothing is clamped: the negative
  mass is what differential attention is about.
- :func:`class_mass` sums a map's signed, positive and negative mass over classes of key tokens
  (e.g. math / noise / other): the attention allocation ratios of seed 004.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["attention_probabilities", "class_mass", "differential_lambda", "differential_map", "is_differential"]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "lambda_init")


def is_differential(module: nn.Module) -> bool:
    """Whether an attention module is differential (has DiffLlama's λ parameters)."""
    return all(hasattr(module, name) for name in _LAMBDAS)


def differential_lambda(module: nn.Module) -> float:
    """The layer's ``λ = exp(Σ λq1·λk1) − exp(Σ λq2·λk2) + λ_init``, computed in float32 as transformers does."""
    q1, k1, q2, k2 = (getattr(module, name).detach().float() for name in _LAMBDAS[:4])
    return float(torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + module.lambda_init)


def differential_map(probabilities: torch.Tensor, lam: float, heads: list[int] | None = None) -> torch.Tensor:
    """``D_i = A_i − λ·A_{i + H/2}`` for the differential heads ``i`` in ``heads`` (all ``H/2`` by default).

    Args:
        probabilities: softmax maps of **all** ``H`` attention heads, heads on dimension ``-3``
            (``(..., H, queries, keys)``); or of a selection laid out the same way, e.g. the maps of
            heads ``[i, j, i + H/2, j + H/2]`` (with ``heads=None`` the first half pairs with the second).
        lam: the layer's λ (:func:`differential_lambda`).
        heads: differential heads, each in ``[0, H/2)``.
    """
    half = probabilities.shape[-3] // 2
    index = torch.arange(half, device=probabilities.device) if heads is None else torch.as_tensor(
        heads, device=probabilities.device)
    return probabilities.index_select(-3, index) - lam * probabilities.index_select(-3, index + half)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    heads: list[int],
    positions: torch.Tensor,
    causal: bool = True,
) -> torch.Tensor:
    """``(len(heads), len(positions), S)`` float32 softmax maps of one sequence's chosen heads and queries.

    Args:
        query: ``(H, T, d)`` queries as the kernel received them (after RoPE and any norms).
        key: ``(H_kv, S, d)`` keys (with the cache's earlier keys); head ``h`` reads key head
            ``h // (H / H_kv)`` (grouped-query attention).
        mask: the kernel's mask for this sequence: additive float or boolean (True = attend), shaped
            ``(1 or H, T, S)``; a 1-D ``(S,)`` key-padding mask (flash attention); or ``None`` for
            a plain causal (or, with ``causal=False``, no) mask.
        scaling: the softmax temperature (``head_dim ** -0.5`` unless the model says otherwise).
        heads: attention heads to compute.
        positions: ``(n,)`` query positions in ``[0, T)``.
        causal: with ``mask=None`` (or a key-padding mask), let query ``t`` see keys up to
            ``t + S − T`` (queries are the last ``T`` of the ``S`` positions).
    """
    heads_t = torch.as_tensor(heads, device=query.device)
    groups = query.shape[0] // key.shape[0]
    q = query.index_select(0, heads_t)[:, positions].float()  # (h, n, d)
    k = key.index_select(0, heads_t // groups).float()  # (h, S, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (h, n, S)
    length, keys = query.shape[1], key.shape[1]
    if mask is not None and mask.dim() == 3:
        rows = mask[:, positions] if mask.shape[0] == 1 else mask.index_select(0, heads_t)[:, positions]
        rows = rows[..., :keys]
        if rows.dtype == torch.bool:
            scores = scores.masked_fill(~rows, float("-inf"))
        else:
            scores = scores + rows.float()
    else:
        allowed = torch.ones(positions.shape[0], keys, dtype=torch.bool, device=query.device)
        if causal:
            allowed = torch.arange(keys, device=query.device)[None, :] <= (positions[:, None] + keys - length)
        if mask is not None:  # (S,) key padding
            allowed = allowed & mask[:keys].bool()[None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def class_mass(weights: torch.Tensor, key_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, ..., num_classes)`` float64 mass of ``weights (..., S)`` on each class of key tokens.

    Rows of the result: the signed mass, the positive part's, and the negative part's (as a
    positive number). Keys of class ``-1`` (padding) count for nothing.

    Args:
        weights: attention maps with the keys last, e.g. ``(heads, queries, S)``.
        key_class: ``(S,)`` class of every key, in ``[0, num_classes)`` or ``-1``.
        num_classes: how many classes there are.
    """
    onehot = torch.zeros(key_class.shape[0], num_classes, dtype=torch.float64, device=weights.device)
    valid = key_class >= 0
    onehot[valid.nonzero().squeeze(-1), key_class[valid]] = 1.0
    w = weights.double()
    parts = torch.stack([w, w.clamp(min=0), (-w).clamp(min=0)])  # (3, ..., S)
    return parts @ onehot
