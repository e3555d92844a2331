"""Influence math on one linear layer: preconditioned query gradients and their contraction with a
training batch's activations and output gradients.

Conventions (``../shared/DESIGN.md``): ``I(z_q, z_m) = ∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)``, positive = the
training example lowers the query's loss. For a linear layer the training gradient is
``DW_m = Σ_t g_t a_tᵀ`` (bias-appended ``a``), so with ``P_q = (H + λI)⁻¹ ∇_W L(z_q)`` the layer's share is
``Σ_t g_tᵀ P_q a_t``: scores come from ``a`` and ``g`` directly.
"""

from __future__ import annotations

import torch

from lit_attrib.layers import LayerInfo
from lit_attrib.ops.gradients import layer_inputs

__all__ = ["LowRank", "PairwiseScores", "low_rank", "pairwise_scores", "token_pairwise_scores"]

LowRank = tuple[torch.Tensor, torch.Tensor]
"""A rank-r factorisation ``P ≈ left @ right`` with ``left (Q, out, r)`` and ``right (Q, r, in)``."""


def low_rank(preconditioned: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of each ``P_q (out, in)`` (truncated SVD), as ``(left, right)``.

    Raises:
        ValueError: ``rank`` is below 1 or above ``min(out, in)``, the largest rank the gradient has.
    """
    out_features, in_features = preconditioned.shape[-2:]
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"query_gradient_rank={rank} is not between 1 and the rank of a ({out_features}, {in_features}) "
            f"gradient ({min(out_features, in_features)}); lower it or set it to null for full rank"
        )
    # The top singular pairs from the eigendecomposition of the smaller Gram matrix, in float64
    # (faster than a full SVD of the tall matrix; float64 keeps the squared condition harmless).
    matrix = preconditioned.double()
    if out_features >= in_features:
        _, right = torch.linalg.eigh(matrix.mT @ matrix)  # ascending eigenvalues
        right = right[..., :, -rank:].flip(-1)  # (Q, in, r)
        left = matrix @ right  # = U_r Σ_r
        return left.to(preconditioned.dtype).contiguous(), right.mT.to(preconditioned.dtype).contiguous()
    _, left = torch.linalg.eigh(matrix @ matrix.mT)
    left = left[..., :, -rank:].flip(-1)  # (Q, out, r): U_r
    right = left.mT @ matrix  # = Σ_r V_rᵀ
    return left.to(preconditioned.dtype).contiguous(), right.to(preconditioned.dtype).contiguous()


def token_pairwise_scores(preconditioned: torch.Tensor | LowRank, activations: torch.Tensor,
                          output_gradients: torch.Tensor) -> torch.Tensor:
    """``S[q, b, t] = g_{b,t}ᵀ P_q a_{b,t}``: each training token's share of the score, ``(Q, B, T)``.

    Args:
        preconditioned: ``P (Q, out, in)`` or its :func:`low_rank` factors.
        activations: ``a (B, T, in)``, bias column appended when the layer has a bias.
        output_gradients: ``g (B, T, out)`` of each example's summed loss.
    """
    if isinstance(preconditioned, tuple):
        left, right = preconditioned
        projected_g = torch.einsum("bto,qor->qbtr", output_gradients, left)
        projected_a = torch.einsum("bti,qri->qbtr", activations, right)
        return (projected_g * projected_a).sum(-1)
    return (torch.einsum("qoi,bti->qbto", preconditioned, activations) * output_gradients.unsqueeze(0)).sum(-1)


def pairwise_scores(preconditioned: torch.Tensor | LowRank, activations: torch.Tensor,
                    output_gradients: torch.Tensor) -> torch.Tensor:
    """``S[q, b] = Σ_t g_{b,t}ᵀ P_q a_{b,t} = ⟨P_q, DW_b⟩``, ``(Q, B)``, by the cheaper contraction.

    A low-rank ``P`` goes through the tokens (``B·T·Q·r·(out + in)`` operations, nothing of size
    ``out × in`` per example). A full-rank ``P`` with several queries goes through the batch's
    gradients of this one layer (``B·T·out·in + Q·B·out·in``, against ``Q·B·T·out·in`` through the
    tokens); they live only for this call.
    """
    if isinstance(preconditioned, tuple) or preconditioned.shape[0] == 1:
        return token_pairwise_scores(preconditioned, activations, output_gradients).sum(-1)
    # Plain matrix products: einsum would copy both operands into its own layout first.
    example_gradients = torch.bmm(output_gradients.mT, activations)  # (B, out, in)
    return preconditioned.flatten(1) @ example_gradients.flatten(1).T


class PairwiseScores:
    """Scores of each training example of a batch against every query, accumulated over the tracked
    layers' uses: ``S[b, q] = Σ_layers Σ_uses Σ_t g_{b,t}ᵀ P_q a_{b,t}``.

    A rank-r ``P`` is multiplied back out to ``(Q, out, in)`` for a layer whenever that contracts
    faster (``(T + Q)·out·in`` against ``T·Q·r·(out + in)``) and the expanded layers stay within
    ``expand_bytes`` together (the decision is made once per layer, at its first use).

    Args:
        preconditioned: each layer's ``P (Q, out, in)`` or its :func:`low_rank` factors.
        dtype: the dtype of ``a``, ``g`` and the scores.
        token_scores: also keep each training token's share ``(B, Q, T)``.
        expand_bytes: memory for expanded rank-r layers (0: never expand).
    """

    def __init__(self, preconditioned: dict[str, torch.Tensor | LowRank], dtype: torch.dtype = torch.float32,
                 token_scores: bool = False, expand_bytes: float = 0.0) -> None:
        self.preconditioned = dict(preconditioned)
        self.dtype = dtype
        self.token_scores = token_scores
        self.expand_bytes = expand_bytes
        self.expanded: list[str] = []
        self._expanded_bytes = 0
        self._decided: set[str] = set()
        self._batch: dict[str, torch.Tensor] = {}

    def begin_batch(self) -> None:
        self._batch = {}

    def add(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        """Add one use of ``layer``: ``a (B, T, in)`` as it entered the layer, ``g (B, T, out)``."""
        a, g = layer_inputs(layer, activations, gradients, self.dtype)
        if layer.name not in self._decided:
            self._maybe_expand(layer.name, tokens=a.shape[1])
        preconditioned = self.preconditioned[layer.name]
        if self.token_scores:
            tokens = token_pairwise_scores(preconditioned, a, g)  # (Q, B, T)
            self._add("token_scores", tokens)
            self._add("scores", tokens.sum(-1))
        else:
            self._add("scores", pairwise_scores(preconditioned, a, g))

    def end_batch(self) -> dict[str, torch.Tensor]:
        """The batch's ``scores (B, Q)`` (and ``token_scores (B, Q, T)``), the example first."""
        result = {"scores": self._batch["scores"].T}
        if self.token_scores:
            result["token_scores"] = self._batch["token_scores"].transpose(0, 1)
        self._batch = {}
        return result

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._batch[key] = self._batch[key] + value if key in self._batch else value

    def _maybe_expand(self, name: str, tokens: int) -> None:
        self._decided.add(name)
        preconditioned = self.preconditioned[name]
        if not isinstance(preconditioned, tuple) or self.token_scores:
            return
        left, right = preconditioned
        queries, out_features, rank = left.shape
        in_features = right.shape[-1]
        through_tokens = tokens * queries * rank * (out_features + in_features)
        expanded = (tokens + queries) * out_features * in_features
        size = queries * out_features * in_features * left.element_size()
        if expanded < through_tokens and self._expanded_bytes + size <= self.expand_bytes:
            self.preconditioned[name] = left @ right  # still rank r, now cheaper to contract
            self._expanded_bytes += size
            self.expanded.append(name)
