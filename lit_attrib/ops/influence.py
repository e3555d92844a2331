"""Influence math on one linear layer: preconditioned query gradients and their contraction with a
training batch's activations and output gradients.

Conventions (``../shared/DESIGN.md``): ``I(z_q, z_m) = ∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)``, positive = the
training example lowers the query's loss. For a linear layer the training gradient is
``DW_m = Σ_t g_t a_tᵀ`` (bias-appended ``a``), so with ``P_q = (H + λI)⁻¹ ∇_W L(z_q)`` the layer's share is
``Σ_t g_tᵀ P_q a_t``: scores come from ``a`` and ``g`` directly.
"""

from __future__ import annotations

import torch

__all__ = ["LowRank", "low_rank", "pairwise_scores", "token_pairwise_scores"]

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
