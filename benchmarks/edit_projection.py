"""Curvature-mass edit of one projection: eigendecomposition, mask selection and projection times.

Seed 003's edit of one MLP projection of the size the issue names (``out`` 2048 × ``in`` 5632) from
random symmetric positive-definite K-FAC factors of the right sizes (``G (out, out)``, ``A (in, in)``):
the float64 eigendecompositions of both factors (``torch.linalg.eigh``), the selection of the
coefficients to keep (``curvature_mass_mask``: one sort of the ``out · in`` masses and a cumulative
sum) and the projection ``W' = U_G (C ⊙ mask) U_Aᵀ`` (``curvature_project``), each timed on its own
(``--repeats`` times, medians). Goal: the mask selection is a small fraction of the eigendecomposition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from _common import lit_attrib_commit, report_load, write_results

from lit_attrib.ops.edit import curvature_mass_mask, curvature_project
from lit_attrib.ops.kfac import eigendecompose

RESULTS = Path(__file__).resolve().parent / "results" / "edit_projection.json"


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """``X Xᵀ / k + 1e-3 I`` with a decaying spectrum, like a covariance of correlated activations."""
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    x = torch.randn(n, n, dtype=torch.float64, generator=generator) * scales
    return x @ x.T / n + 1e-3 * torch.eye(n, dtype=torch.float64)


def timed(function, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--in-features", type=int, default=5632)
    parser.add_argument("--rho", type=float, default=0.6, help="fraction of curvature mass kept")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the mask and the projection")
    parser.add_argument("--eigh-repeats", type=int, default=1, help="timed runs of each eigendecomposition")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    generator = torch.Generator().manual_seed(0)
    g, a = random_spd(args.out_features, generator), random_spd(args.in_features, generator)
    weight = torch.randn(args.out_features, args.in_features, generator=generator)
    eigh_g, eigh_g_runs, (lam, u_g) = timed(lambda: eigendecompose(g), args.eigh_repeats)
    eigh_a, eigh_a_runs, (mu, u_a) = timed(lambda: eigendecompose(a), args.eigh_repeats)
    mask_s, mask_runs, mask = timed(lambda: curvature_mass_mask(lam, mu, args.rho), args.repeats)
    project_s, project_runs, _ = timed(lambda: curvature_project(weight, u_g, u_a, mask), args.repeats)
    eigh_s = eigh_g + eigh_a
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "lit_attrib_commit": lit_attrib_commit()},
        "seconds": {"eigh_gradient": eigh_g, "eigh_activation": eigh_a, "eigendecomposition": eigh_s,
                    "mask": mask_s, "projection": project_s, "total": eigh_s + mask_s + project_s},
        "runs": {"eigh_gradient": eigh_g_runs, "eigh_activation": eigh_a_runs, "mask": mask_runs,
                 "projection": project_runs},
        "mask_over_eigendecomposition": mask_s / eigh_s,
        "kept_fraction_of_coefficients": float(mask.double().mean()),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    s = results["seconds"]
    print(f"edit of one {args.out_features} × {args.in_features} projection (rho {args.rho}, {args.threads} threads):")
    print(f"  eigendecomposition {s['eigendecomposition']:.2f} s (G {eigh_g:.2f} s, A {eigh_a:.2f} s)")
    print(f"  mask selection     {s['mask']:.2f} s ({results['mask_over_eigendecomposition']:.1%} of the "
          f"eigendecomposition; keeps {results['kept_fraction_of_coefficients']:.1%} of the coefficients)")
    print(f"  projection         {s['projection']:.2f} s")
    report_load(results["load_average_1min"], args.threads)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
