"""Curvature-mass weight edit (seed 003): keep a weight's components along high-curvature K-FAC directions.

With ``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ`` (a layer's K-FAC factors), the weight in
the eigenbasis is ``C = U_Gᵀ W U_A``; coefficient ``C_ij`` carries curvature mass ``Π_ij = λ_i μ_j``
(negative eigenvalues, round-off of a PSD factor, count as 0). The edit keeps the fewest
coefficients whose mass reaches ``ρ · M`` (``M = Σ_ij Π_ij = Σλ · Σμ``), largest mass first, and zeroes
the rest: ``W' = U_G (C ⊙ mask) U_Aᵀ``. ``ρ = 1`` keeps everything (the weight is unchanged),
``ρ = 0`` nothing.

The selection is one vectorised sort of the ``out · in`` products and a cumulative sum (no heap).

Reference: Merullo et al. 2025, "From Memorization to Reasoning in the Spectrum of Loss Curvature",
https://arxiv.org/abs/2510.24256.
"""

from __future__ import annotations

import torch

from lit_attrib.ops.kfac import eigendecompose

__all__ = ["EigenCache", "curvature_mass_mask", "curvature_project"]


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (the fraction of curvature mass to keep) must be in [0, 1]; got {rho}")


def curvature_mass_mask(gradient_eigenvalues: torch.Tensor, activation_eigenvalues: torch.Tensor,
                        rho: float) -> torch.Tensor:
    """The ``(out, in)`` boolean mask of the coefficients the edit keeps.

    Args:
        gradient_eigenvalues: ``λ (out,)`` of ``G``.
        activation_eigenvalues: ``μ (in,)`` of ``A``.
        rho: fraction of the total curvature mass to keep, in ``[0, 1]``.

    Returns:
        ``mask`` with the fewest ``True`` entries whose masses ``λ_i μ_j`` sum to at least ``ρ · M``,
        largest first (all of them for ``ρ = 1``, none for ``ρ = 0``).

    Raises:
        ValueError: ``rho`` outside ``[0, 1]``.
    """
    _check_rho(rho)
    lam = gradient_eigenvalues.double().clamp(min=0)
    mu = activation_eigenvalues.double().clamp(min=0)
    shape = (lam.numel(), mu.numel())
    if rho >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=lam.device)
    mask = torch.zeros(lam.numel() * mu.numel(), dtype=torch.bool, device=lam.device)
    mass = torch.outer(lam, mu).flatten()
    target = rho * float(mass.sum())
    if rho <= 0.0 or target <= 0.0:
        return mask.view(shape)
    order = torch.argsort(mass, descending=True)
    kept = torch.cumsum(mass[order], 0)
    # the first position whose running sum reaches the target (round-off: never past the end)
    count = min(int(torch.searchsorted(kept, torch.tensor([target], dtype=kept.dtype, device=kept.device))[0]) + 1,
                mass.numel())
    mask[order[:count]] = True
    return mask.view(shape)


def curvature_project(weight: torch.Tensor, gradient_eigenvectors: torch.Tensor, activation_eigenvectors: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """``W' = U_G ((U_Gᵀ W U_A) ⊙ mask) U_Aᵀ`` in float64, returned in the weight's dtype.

    ``weight (out, in)`` in the factors' layout (bias column appended when the factors have one).
    """
    u_g = gradient_eigenvectors.double()
    u_a = activation_eigenvectors.double()
    if weight.shape != (u_g.shape[0], u_a.shape[0]) or mask.shape != weight.shape:
        raise ValueError(f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)} and eigenvector bases "
                         f"{tuple(u_g.shape)} / {tuple(u_a.shape)} do not fit: expected (out, in) = "
                         f"({u_g.shape[0]}, {u_a.shape[0]})")
    coefficients = u_g.T @ weight.double() @ u_a
    return (u_g @ (coefficients * mask) @ u_a.T).to(weight.dtype)


class EigenCache:
    """Eigendecompositions of covariance factors, computed once per factor (keyed by the caller's identity
    of the factor, e.g. ``(factors_path, module, "activation")``). The cache holds them on the CPU (device
    memory is the model's) and hands them out on the covariance's device."""

    def __init__(self) -> None:
        self._store: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: object, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eigenvalues ascending, eigenvectors)`` of ``covariance``, from the cache when known."""
        cached = self._store.get(key)
        if cached is None:
            values, vectors = eigendecompose(covariance)
            self._store[key] = (values.cpu(), vectors.cpu())
            return values, vectors
        return cached[0].to(covariance.device), cached[1].to(covariance.device)

    def __len__(self) -> int:
        return len(self._store)
