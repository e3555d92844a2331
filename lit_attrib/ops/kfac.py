"""K-FAC / EKFAC math: covariances, eigenbases, the eigenvalue correction and the damped inverse-HVP.

Conventions (``../shared/DESIGN.md``): a linear layer is ``y = W a (+ b)`` with ``W`` of shape
``(out, in)``; a bias is handled by appending 1 to ``a``. Per-example gradients ``DW = Σ_t g_t a_tᵀ``
use ``g`` of the **sum**-reduced loss of the example. ``A = E[a aᵀ]`` and ``G = E[g gᵀ]`` over
non-padding tokens; EKFAC's ``Λ = E_examples[(Q_Gᵀ DW Q_A)²]``; the inverse-HVP of ``V`` is
``Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ``. Reference: George et al. 2018, https://arxiv.org/abs/1806.03884.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_attrib.ops.workspaces import Workspaces

__all__ = [
    "DEFAULT_DAMPING_FACTOR",
    "ERROR_SAMPLE_ROWS",
    "LargestError",
    "TokenGradients",
    "append_bias_column",
    "default_damping",
    "eigen_residual",
    "eigendecompose",
    "ekfac_inverse_hvp",
    "factors_inverse_hvp",
    "kfac_lambda",
    "per_example_gradient",
    "rotate_gradient",
]

DEFAULT_DAMPING_FACTOR = 0.1
"""Default damping ``λ = 0.1 · mean(Λ)``."""

ERROR_SAMPLE_ROWS = 64
"""Rows of each result that a narrower rotation back (``ekfac_inverse_hvp(back_dtype=)``) is checked on."""


@dataclass
class LargestError:
    """The largest relative error seen, by :func:`ekfac_inverse_hvp` with a ``back_dtype`` (see there)."""

    value: float = 0.0

    def update(self, error: float) -> None:
        self.value = max(self.value, error)


def append_bias_column(activations: torch.Tensor) -> torch.Tensor:
    """``(..., in) -> (..., in + 1)`` with a trailing column of ones (the bias input)."""
    ones = activations.new_ones(*activations.shape[:-1], 1)
    return torch.cat([activations, ones], dim=-1)


def eigendecompose(covariance: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(d,)`` (ascending) and eigenvectors ``(d, d)`` (columns), computed and returned in ``dtype``.

    The matrix is symmetrised first: sums of outer products are symmetric only up to rounding.
    """
    matrix = covariance.to(dtype)
    return torch.linalg.eigh(0.5 * (matrix + matrix.T))


def eigen_residual(covariance: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> float:
    """``‖C V − V diag(w)‖_F / ‖C‖_F``, in ``vectors``' dtype: how far an eigendecomposition is from exact."""
    matrix = covariance.to(vectors.dtype)
    norm = float(matrix.norm())
    return float((matrix @ vectors - vectors * values.to(vectors.dtype)).norm()) / norm if norm > 0 else 0.0


def per_example_gradient(activations: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """``DW_b = Σ_t g_{b,t} a_{b,t}ᵀ``: ``a (B, T, in)``, ``g (B, T, out)`` -> ``(B, out, in)``."""
    return torch.einsum("bto,bti->boi", output_gradients, activations)


@dataclass(frozen=True)
class TokenGradients:
    """A batch of per-example layer gradients kept as their tokens, ``DW_b = Σ_t g_{b,t} a_{b,t}ᵀ``.

    Products with ``DW`` from one side can go through the ``T`` tokens instead of the ``out × in``
    matrix: rotating into an eigenbasis costs ``T·(out² + in²)`` per example this way against
    ``out·in·(out + in)`` from ``DW`` (see :func:`rotate_gradient`).

    Attributes:
        activations: ``a (B, T, in)``, bias column appended when the layer has a bias.
        gradients: ``g (B, T, out)`` of each example's summed loss (zeros where a token carries no loss).
    """

    activations: torch.Tensor
    gradients: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The shape of the gradients they stand for, ``(B, out, in)``."""
        return torch.Size((self.activations.shape[0], self.gradients.shape[-1], self.activations.shape[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.activations.dtype

    def full(self) -> torch.Tensor:
        """``DW (B, out, in)``."""
        return per_example_gradient(self.activations, self.gradients)


def rotate_gradient(
    gradient: torch.Tensor | TokenGradients, activation_eigenvectors: torch.Tensor, gradient_eigenvectors: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q_Gᵀ V Q_A`` for ``V (..., out, in)``, or for a batch of :class:`TokenGradients` (into ``out`` if given).

    Token gradients are rotated token by token, ``Σ_t (Q_Gᵀ g_t)(Q_Aᵀ a_t)ᵀ``, when that is the cheaper
    way (``T·(out² + in²) < out·in·(out + in)``: fewer tokens than about the layer's width), else
    multiplied out first. Both give the same matrix up to rounding.
    """
    if isinstance(gradient, TokenGradients):
        out_features, in_features = gradient.shape[-2:]
        tokens = gradient.activations.shape[-2]
        if tokens * (out_features ** 2 + in_features ** 2) < out_features * in_features * (out_features + in_features):
            return torch.matmul((gradient.gradients @ gradient_eigenvectors).mT,
                                gradient.activations @ activation_eigenvectors, out=out)
        gradient = gradient.full()
    return torch.matmul(gradient_eigenvectors.T @ gradient, activation_eigenvectors, out=out)


def kfac_lambda(activation_eigenvalues: torch.Tensor, gradient_eigenvalues: torch.Tensor) -> torch.Tensor:
    """K-FAC's eigenvalues of ``G ⊗ A`` arranged as ``(out, in)``: ``λ_G,i · μ_A,j``."""
    return torch.outer(gradient_eigenvalues, activation_eigenvalues)


def default_damping(lambda_matrix: torch.Tensor, factor: float = DEFAULT_DAMPING_FACTOR) -> float:
    """``factor · mean(Λ)``, the damping used when none is given."""
    return factor * float(lambda_matrix.mean(dtype=torch.float64))


def ekfac_inverse_hvp(
    vector: torch.Tensor | TokenGradients,
    activation_eigenvectors: torch.Tensor,
    gradient_eigenvectors: torch.Tensor,
    lambda_matrix: torch.Tensor,
    damping: float | None = None,
    out: torch.Tensor | None = None,
    workspaces: Workspaces | None = None,
    back_dtype: torch.dtype | None = None,
    error: LargestError | None = None,
) -> torch.Tensor:
    """``(H + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` for ``V (..., out, in)``.

    Args:
        vector: one or a batch of layer-shaped gradients, in the bias-appended layout, or a batch of
            :class:`TokenGradients` (rotated through their tokens where that is cheaper).
        activation_eigenvectors: ``Q_A (in, in)``.
        gradient_eigenvectors: ``Q_G (out, out)``.
        lambda_matrix: ``Λ (out, in)``: EKFAC's corrected eigenvalues or :func:`kfac_lambda`.
        damping: ``λ``; ``None`` for :func:`default_damping`.
        out: where to write the result (shaped like ``vector``'s gradients), e.g. rows of a larger buffer.
        workspaces: buffers reused for the two ``(B, out, in)`` intermediates of a batch (one pass over many
            layers then frees no such temporary between other allocations: that fragments the heap).
        back_dtype: run the rotation back out of the eigenbasis, ``Q_G M Q_Aᵀ`` (``out·in·(out + in)``
            multiply-adds, most of the work for full-width gradients), in this narrower dtype (e.g.
            ``torch.bfloat16``: about 2× faster per layer on a CPU with AMX for SmolLM2's shapes); the
            result is then in ``back_dtype`` (copied into ``out`` if given). The rotation into the
            eigenbasis and the division by ``Λ + λ`` stay in ``vector``'s dtype: there rounding would
            be amplified where ``Λ`` is small; rotating back is orthogonal and is not.
        error: with ``back_dtype``, updated with the relative (Frobenius) error of the result against
            ``vector``'s dtype, measured on :data:`ERROR_SAMPLE_ROWS` evenly spaced rows of each result.

    Raises:
        ValueError: shapes that do not fit together, or a damping that leaves ``Λ + λ`` non-positive.
    """
    out_features, in_features = lambda_matrix.shape
    if vector.shape[-2:] != (out_features, in_features):
        raise ValueError(f"expected a vector of shape (..., {out_features}, {in_features}); got {tuple(vector.shape)}")
    if damping is None:
        damping = default_damping(lambda_matrix)
    denominator = lambda_matrix + damping
    if not bool((denominator > 0).all()):
        raise ValueError(f"damping {damping} leaves non-positive entries in Λ + λ; use a larger damping")
    narrow = back_dtype is not None and back_dtype != vector.dtype
    batched = workspaces is not None and len(vector.shape) == 3
    shape, size = (out_features, in_features), vector.shape[0] if len(vector.shape) == 3 else 0
    first = workspaces.get(size, shape, activation_eigenvectors.new_empty(0), 1) if batched else None
    scaled = rotate_gradient(vector, activation_eigenvectors, gradient_eigenvectors, out=first).div_(denominator)
    if not narrow:
        second = workspaces.get(size, shape, activation_eigenvectors.new_empty(0), 2) if batched else None
        middle = torch.matmul(gradient_eigenvectors, scaled, out=second)
        return torch.matmul(middle, activation_eigenvectors.T, out=out)
    like = activation_eigenvectors.new_empty(0, dtype=back_dtype)
    low = workspaces.get(size, shape, like, 3).copy_(scaled) if batched else scaled.to(back_dtype)
    right = activation_eigenvectors.T.to(back_dtype)
    middle = torch.matmul(gradient_eigenvectors.to(back_dtype), low,
                          out=workspaces.get(size, shape, like, 4) if batched else None)
    result = torch.matmul(middle, right)
    if error is not None:  # against the full-precision rows, a few of them (``rows·out·in`` each)
        rows = torch.linspace(0, out_features - 1, min(ERROR_SAMPLE_ROWS, out_features)).round().long().unique()
        reference = torch.matmul(gradient_eigenvectors[rows.to(scaled.device)], scaled) @ activation_eigenvectors.T
        norm = float(reference.norm())
        if norm > 0:
            difference = result[..., rows.to(result.device), :].to(reference.dtype) - reference
            error.update(float(difference.norm()) / norm)
    return result if out is None else out.copy_(result)


def factors_inverse_hvp(factors: dict[str, torch.Tensor], vector: torch.Tensor | TokenGradients,
                        damping: float | None = None, out: torch.Tensor | None = None,
                        workspaces: Workspaces | None = None, back_dtype: torch.dtype | None = None,
                        error: LargestError | None = None) -> torch.Tensor:
    """:func:`ekfac_inverse_hvp` with one layer's saved factors (``activation_eigenvectors``,
    ``gradient_eigenvectors``, ``lambda``), cast to ``vector``'s dtype."""
    dtype = vector.dtype
    return ekfac_inverse_hvp(vector, factors["activation_eigenvectors"].to(dtype),
                             factors["gradient_eigenvectors"].to(dtype), factors["lambda"].to(dtype), damping, out,
                             workspaces, back_dtype, error)
