"""The curvature-mass edit (seed 003) against a brute-force reference: enumerate, sort, accumulate."""

from __future__ import annotations

import pytest
import torch

from lit_attrib.ops.edit import EigenCache, curvature_mass_mask, curvature_project
from lit_attrib.ops.kfac import eigendecompose


def spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 3 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x @ x.T / (3 * n)


def brute_force_mask(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """Every pair with its mass, sorted by a plain Python sort, kept until the running sum reaches ρ·M."""
    pairs = sorted(((float(lam[i]) * float(mu[j]), i, j) for i in range(len(lam)) for j in range(len(mu))),
                   key=lambda pair: -pair[0])
    total = sum(mass for mass, _, _ in pairs)
    mask = torch.zeros(len(lam), len(mu), dtype=torch.bool)
    running = 0.0
    for mass, i, j in pairs:
        if rho == 0.0 or running >= rho * total:
            break
        mask[i, j] = True
        running += mass
    return mask


@pytest.mark.parametrize("rho", [0.1, 0.35, 0.6, 0.9, 0.999])
def test_mask_equals_the_brute_force_reference_and_is_minimal(rho):
    lam, _ = eigendecompose(spd(7, 1))
    mu, _ = eigendecompose(spd(9, 2))
    mask = curvature_mass_mask(lam, mu, rho)
    assert torch.equal(mask, brute_force_mask(lam, mu, rho))
    mass = torch.outer(lam, mu)
    kept = mass[mask]
    assert float(kept.sum()) >= rho * float(mass.sum())
    assert float(kept.sum() - kept.min()) < rho * float(mass.sum())  # dropping the smallest kept pair falls short


def test_rho_one_leaves_the_weight_unchanged_and_zero_zeroes_it():
    a, g = spd(6, 3), spd(4, 4)
    mu, u_a = eigendecompose(a)
    lam, u_g = eigendecompose(g)
    weight = torch.randn(4, 6, dtype=torch.float64)
    full = curvature_project(weight, u_g, u_a, curvature_mass_mask(lam, mu, 1.0))
    torch.testing.assert_close(full, weight, rtol=1e-12, atol=1e-12)
    assert torch.equal(curvature_project(weight, u_g, u_a, curvature_mass_mask(lam, mu, 0.0)), torch.zeros_like(weight))


def test_projection_keeps_exactly_the_masked_coefficients():
    a, g = spd(5, 5), spd(3, 6)
    mu, u_a = eigendecompose(a)
    lam, u_g = eigendecompose(g)
    weight = torch.randn(3, 5, dtype=torch.float64)
    mask = curvature_mass_mask(lam, mu, 0.5)
    edited = curvature_project(weight, u_g, u_a, mask)
    before, after = u_g.T @ weight @ u_a, u_g.T @ edited @ u_a  # coefficients in the eigenbasis
    torch.testing.assert_close(after[mask], before[mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(after[~mask], torch.zeros_like(after[~mask]), rtol=0, atol=1e-12)


def test_negative_round_off_eigenvalues_carry_no_mass():
    mask = curvature_mass_mask(torch.tensor([-1e-18, 2.0]), torch.tensor([1.0, -3e-17, 3.0]), 0.999)
    assert mask[0].sum() == 0 and mask[1, 1] == 0 and mask[1, 0] and mask[1, 2]


def test_bad_rho_and_shapes_are_refused():
    with pytest.raises(ValueError, match=r"rho .* must be in \[0, 1\]; got 1.5"):
        curvature_mass_mask(torch.ones(2), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="do not fit"):
        curvature_project(torch.zeros(3, 4), torch.eye(3), torch.eye(5), torch.ones(3, 4, dtype=torch.bool))


def test_eigendecompositions_are_cached_by_key():
    cache = EigenCache()
    a = spd(4, 7)
    first = cache(("factors", "layer", "activation"), a)
    second = cache(("factors", "layer", "activation"), a * 2)  # same key: the cached result
    assert first[0] is second[0] and len(cache) == 1
    torch.testing.assert_close(first[1] @ torch.diag(first[0]) @ first[1].T, a, rtol=1e-10, atol=1e-12)
