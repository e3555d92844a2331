"""Accuracy of the gradient index against exact EKFAC influence on the quickstart model (issue 17).

The quickstart model (``configs/quickstart.yaml``'s Llama: hidden 96, MLP 256, 2 layers, 4 heads; built
from config, no downloads) is trained on the facts data with ``influence_lds.py``'s recipe (AdamW, lr 3e-3,
cosine schedule with 5 % warmup, 20 epochs of batches of 16), and its 518 training rows are scored against
the 58 validation queries

- **exactly**, as ``influence_lds.py`` does (``KFACCollectorCallback`` in ``Trainer.predict``, then
  ``InfluenceCallback``): EKFAC with the default damping, and identity (plain gradient dot products);
- by the **gradient index**: ``GradientIndexCallback(stages=["predict"], projection_dim=k)`` over the same
  training rows (default float16 rows, projected K-FAC curvature fitted in the same pass), queried with
  ``GradientIndex.query_rows`` and ``GradientIndex.scores`` with ``curvature="kfac"`` and ``"identity"``,
  for each ``k`` of ``--ks`` and projection seed of ``--seeds``.

Both over the same layers: each set of ``--layer-sets`` (``all``: the attention and MLP projections,
14 layers, as ``influence_lds.py``; ``mlp``: the index's default ``*.mlp.*_proj``, 6 layers).

Against exact EKFAC (and, for the identity index, against the exact identity scores: the projection's
error alone) it reports, averaged over the queries: the Pearson correlation of a query's scores over the
training rows, and the overlap of its top 10 (``|top10 ∩ top10_exact| / 10``). The LDS of every score
matrix comes from the same retrained subsets (``influence_lds.py``'s ``retrain``: ``--subsets`` seeded
random halves, each trained from the same initial weights with the same recipe). Goal (issue 17): top-10
overlap ≥ 0.8 and LDS within 0.05 of exact at the default k (32). The index build is timed against the
exact pass (factors + influence), in the same run.

The retrained query losses are cached in the results JSON: ``--reuse`` takes them from an earlier run
with the same model, recipe and subsets (then only the scores are computed again).

Run: ``python benchmarks/index_accuracy.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: use this checkout's lit_attrib
    sys.path.insert(0, str(ROOT))

import torch
from _common import lit_attrib_commit, lit_attrib_sources, write_results
from influence_lds import (
    TARGETS,
    _worker_init,
    add_recipe_arguments,
    datamodule,
    example_losses,
    fit_factors,
    identity_factors,
    module_kwargs,
    quiet,
    retrain,
    rows,
    spearman_per_query,
    summary,
    train,
    trainer,
)

RESULTS = ROOT / "benchmarks" / "results" / "index_accuracy.json"
LAYER_SETS = {"all": TARGETS, "mlp": ["*.mlp.*_proj"]}
TOP = 10
DEFAULT_K = 32  # GradientIndexCallback's projection_dim default


# ---------------------------------------------------------------------------------------- scores
def exact_scores(module, data, factors: Path, folder: Path, targets: list[str], damping: float | None) -> dict:
    """``InfluenceCallback`` over ``targets`` with the given factors: ``scores (Q, N)`` and the ids."""
    from safetensors.torch import load_file

    from lit_attrib.callbacks import InfluenceCallback

    callback = InfluenceCallback(factors=str(factors), queries="query", target_modules=targets, damping=damping,
                                 output_dir=str(folder), overwrite=True)
    trainer(callbacks=[callback]).predict(module, datamodule=data, return_predictions=False)
    return load_file(str(folder / "scores.safetensors"))


def build_index(module, data, folder: Path, targets: list[str], k: int, seed: int):
    """A gradient index of the training rows built in a predict pass (the callback's defaults otherwise)."""
    from lit_attrib.callbacks import GradientIndexCallback
    from lit_attrib.index import GradientIndex

    callback = GradientIndexCallback(target_modules=targets, projection_dim=k, seed=seed, stages=["predict"],
                                     output_dir=str(folder), overwrite=True)
    trainer(callbacks=[callback]).predict(module, datamodule=data, return_predictions=False)
    return GradientIndex(folder)


def index_scores(index, module, data) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]:
    """Scores ``(Q, N)`` of the queries with the K-FAC and identity curvature, the index's ids, the query
    ids, and the seconds the queries took (query gradients and both score matrices)."""
    tick = time.perf_counter()
    with torch.enable_grad():
        query_rows, query_ids = index.query_rows(module, data.query_dataloader())
    scores = {"kfac": index.scores(query_rows, curvature="kfac"),
              "identity": index.scores(query_rows, curvature="identity")}
    return scores, index.ids, query_ids, time.perf_counter() - tick


# ------------------------------------------------------------------------------------- agreement
def pearson_per_query(scores: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Pearson's r over the training rows (axis 1) for each query (axis 0)."""
    a = scores - scores.mean(1, keepdim=True)
    b = exact - exact.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def top_overlap_per_query(scores: torch.Tensor, exact: torch.Tensor, top: int = TOP) -> torch.Tensor:
    """``|top(scores) ∩ top(exact)| / top`` for each query (most helpful = highest scores)."""
    mine, theirs = scores.topk(top, dim=1).indices, exact.topk(top, dim=1).indices
    return (mine[:, :, None] == theirs[:, None, :]).any(2).double().mean(1)


def lds(scores: torch.Tensor, membership: torch.Tensor, actual: torch.Tensor) -> list[float]:
    """Per-query Spearman over the subsets of ``const − Σ_{m∈S_k} score[q, m]`` against the actual losses."""
    return spearman_per_query(-(membership @ scores.T), actual)


# -------------------------------------------------------------------------------------- retraining
def retrain_key(args: argparse.Namespace) -> dict:
    """What the retrained query losses depend on: a cached run is reused only if all of these match."""
    return {key: getattr(args, key) for key in (
        "hidden_size", "intermediate_size", "layers", "epochs", "learning_rate", "weight_decay", "scheduler",
        "warmup", "batch_size", "init_seed", "order_seed", "num_samples", "queries", "subsets", "fraction",
        "subset_seed")}


def retrained_losses(args, module_args, recipe, train_rows, query_rows, subsets) -> tuple[torch.Tensor, str]:
    """``(M, Q)`` query losses of the models retrained on each subset, from ``--reuse`` when it matches."""
    if args.reuse is not None and args.reuse.is_file():
        cached = json.loads(args.reuse.read_text())
        if cached.get("retrain_key") == retrain_key(args) and cached.get("retrained_query_losses"):
            return torch.tensor(cached["retrained_query_losses"], dtype=torch.float64), f"reused from {args.reuse}"
        print(f"--reuse {args.reuse}: other model, recipe or subsets; retraining", flush=True)
    jobs = [(module_args, recipe, train_rows, query_rows, subset) for subset in subsets]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            losses = list(pool.map(retrain, jobs))
    else:
        losses = [retrain(job) for job in jobs]
    return torch.tensor(losses, dtype=torch.float64), "retrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64], help="projection_dim per side")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="projection seeds")
    parser.add_argument("--layer-sets", nargs="+", choices=list(LAYER_SETS), default=["all", "mlp"])
    add_recipe_arguments(parser, hidden_size=96)
    parser.add_argument("--num-samples", type=int, default=None, help="use only the first rows of the file")
    parser.add_argument("--queries", type=int, default=None, help="validation rows used as queries (all if unset)")
    parser.add_argument("--subsets", type=int, default=30, help="retrained subsets for the LDS")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--damping", type=float, default=None, help="exact EKFAC damping (default 0.1 · mean(Λ))")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each) for the retraining")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="results JSON of an earlier run whose retrained query losses to reuse if they match")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.subsets < 2:
        parser.error("--subsets must be at least 2")
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timings: dict[str, float] = {}

    data = datamodule(args)
    train_rows, query_rows = rows(data.train_dataset), rows(data.query_dataset)
    module_args = module_kwargs(args)
    recipe = {"epochs": args.epochs, "batch_size": args.batch_size, "order_seed": args.order_seed,
              "pad_token_id": data.tokenizer.pad_token_id}
    train_index = torch.tensor([row["index"] for row in train_rows])
    query_index = torch.tensor([row["index"] for row in query_rows])
    print(f"data: {len(train_rows)} training rows, {len(query_rows)} queries", flush=True)

    tick = time.perf_counter()
    module = train(module_args, recipe, train_rows)
    timings["train_full_s"] = time.perf_counter() - tick
    print(f"full model: {timings['train_full_s']:.1f} s; mean summed answer NLL queries "
          f"{float(example_losses(module, recipe, query_rows).mean()):.3f}", flush=True)

    # Exact scores: EKFAC factors over every layer of TARGETS (the influence pass picks a layer set's).
    scores: dict[str, dict[str, torch.Tensor]] = {}
    index_timings: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="index_accuracy_") as tmp:
        tmp = Path(tmp)
        tick = time.perf_counter()
        fit_factors(module, data, "ekfac", tmp / "factors_ekfac")
        timings["factors_ekfac_s"] = time.perf_counter() - tick
        identity_factors(tmp / "factors_ekfac", tmp / "factors_identity")
        for layer_set in args.layer_sets:
            targets = LAYER_SETS[layer_set]
            scores[layer_set] = {}
            for method, damping in (("ekfac", args.damping), ("identity", 0.0)):
                tick = time.perf_counter()
                result = exact_scores(module, data, tmp / f"factors_{method}", tmp / f"scores_{layer_set}_{method}",
                                      targets, damping)
                timings[f"exact_{layer_set}_{method}_s"] = time.perf_counter() - tick
                assert torch.equal(result["train_indices"], train_index), "training columns out of dataset order"
                assert torch.equal(result["query_indices"], query_index), "query rows out of order"
                scores[layer_set][f"exact {method}"] = result["scores"].double()
            for k in args.ks:
                for seed in args.seeds:
                    tick = time.perf_counter()
                    index = build_index(module, data, tmp / f"index_{layer_set}_{k}_{seed}", LAYER_SETS[layer_set],
                                        k, seed)
                    build_s = time.perf_counter() - tick
                    by_curvature, ids, query_ids, query_s = index_scores(index, module, data)
                    assert torch.equal(query_ids, query_index), "index query rows out of order"
                    order = torch.argsort(ids)
                    assert torch.equal(ids[order], train_index), "the index's rows are not the training rows"
                    for curvature, matrix in by_curvature.items():
                        scores[layer_set][f"k={k} seed={seed} {curvature}"] = matrix[:, order]
                    index_timings[f"{layer_set} k={k} seed={seed}"] = {"build_s": build_s, "query_s": query_s,
                                                                       "width": index.width}
                    print(f"[{layer_set}] k={k} seed={seed}: index build {build_s:.1f} s (width {index.width}), "
                          f"queries {query_s:.1f} s", flush=True)
    print("exact: factors " + f"{timings['factors_ekfac_s']:.1f} s, "
          + ", ".join(f"{key[6:-2]} {value:.1f} s" for key, value in timings.items() if key.startswith("exact_")),
          flush=True)

    # Retraining (or the cached losses of an earlier run).
    generator = torch.Generator().manual_seed(args.subset_seed)
    size = round(args.fraction * len(train_rows))
    subsets = [sorted(torch.randperm(len(train_rows), generator=generator)[:size].tolist())
               for _ in range(args.subsets)]
    tick = time.perf_counter()
    actual, source = retrained_losses(args, module_args, recipe, train_rows, query_rows, subsets)
    timings["retrain_s"] = time.perf_counter() - tick
    print(f"{source}: {len(subsets)} subsets of {size} rows in {timings['retrain_s']:.1f} s", flush=True)
    membership = torch.zeros(len(subsets), len(train_rows), dtype=torch.float64)
    for position, subset in enumerate(subsets):
        membership[position, subset] = 1.0

    # Agreement and LDS.
    table: dict[str, list[dict]] = {}
    for layer_set, matrices in scores.items():
        exact = {"ekfac": matrices["exact ekfac"], "identity": matrices["exact identity"]}
        exact_per_query = {m: torch.tensor(lds(exact[m], membership, actual)) for m in exact}
        exact_lds = {m: summary(exact_per_query[m].tolist()) for m in exact}
        rows_out = [{"method": f"exact {m}", "k": None, "curvature": m, "lds": exact_lds[m]["mean"],
                     "lds_stderr": exact_lds[m]["stderr"]} for m in exact]
        for k in args.ks:
            for curvature in ("kfac", "identity"):
                per_seed = []
                for seed in args.seeds:
                    matrix = matrices[f"k={k} seed={seed} {curvature}"]
                    per_query = torch.tensor(lds(matrix, membership, actual))
                    paired = per_query - exact_per_query["ekfac"]  # same subsets and queries: a paired difference
                    entry = {"seed": seed, "lds": summary(per_query.tolist())["mean"],
                             "lds_minus_exact_ekfac_stderr": float(paired.std() / len(paired) ** 0.5)}
                    for reference, target in exact.items():
                        entry[f"pearson_vs_{reference}"] = float(pearson_per_query(matrix, target).mean())
                        entry[f"top{TOP}_vs_{reference}"] = float(top_overlap_per_query(matrix, target).mean())
                    per_seed.append(entry)
                mean = {key: sum(e[key] for e in per_seed) / len(per_seed) for key in per_seed[0] if key != "seed"}
                spread = {key: (min(e[key] for e in per_seed), max(e[key] for e in per_seed)) for key in mean}
                rows_out.append({"method": "index", "k": k, "curvature": curvature, **mean,
                                 "lds_minus_exact_ekfac": mean["lds"] - exact_lds["ekfac"]["mean"],
                                 "range_over_seeds": spread, "per_seed": per_seed})
        table[layer_set] = rows_out

    builds = [t["build_s"] for t in index_timings.values()]
    queries = [t["query_s"] for t in index_timings.values()]
    exact_pass = {layer_set: timings["factors_ekfac_s"] + timings[f"exact_{layer_set}_ekfac_s"]
                  for layer_set in args.layer_sets}
    timings["total_s"] = time.perf_counter() - started
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    for layer_set, rows_out in table.items():
        print(f"\n[{layer_set}: {', '.join(LAYER_SETS[layer_set])}]")
        print(f"{'method':<16} {'k':>3} {'r vs EKFAC':>10} {'top10 vs EKFAC':>14} {'r vs id':>8} {'top10 vs id':>11} "
              f"{'LDS':>7} {'Δ LDS':>7}")
        for row in rows_out:
            if row["method"].startswith("exact"):
                print(f"{row['method']:<16} {'':>3} {'':>10} {'':>14} {'':>8} {'':>11} {row['lds']:7.3f}")
                continue
            print(f"{'index ' + row['curvature']:<16} {row['k']:>3} {row['pearson_vs_ekfac']:10.3f} "
                  f"{row[f'top{TOP}_vs_ekfac']:14.3f} {row['pearson_vs_identity']:8.3f} "
                  f"{row[f'top{TOP}_vs_identity']:11.3f} {row['lds']:7.3f} {row['lds_minus_exact_ekfac']:+7.3f}")
        default = next((r for r in rows_out if r.get("k") == DEFAULT_K and r["curvature"] == "kfac"), None)
        if default is not None:
            met = default[f"top{TOP}_vs_ekfac"] >= 0.8 and abs(default["lds_minus_exact_ekfac"]) <= 0.05
            print(f"goal at k={DEFAULT_K} (K-FAC): top-{TOP} overlap {default[f'top{TOP}_vs_ekfac']:.3f} (≥ 0.8), "
                  f"LDS − exact {default['lds_minus_exact_ekfac']:+.3f} (within 0.05) -> {'met' if met else 'NOT met'}")
        print(f"time: exact pass (EKFAC factors + influence) {exact_pass[layer_set]:.1f} s; index builds "
              + ", ".join(f"k={k} {min(index_timings[f'{layer_set} k={k} seed={s}']['build_s'] for s in args.seeds):.1f}"
                          for k in args.ks) + " s (fastest over seeds)")
    print(f"\nload average {load_before} before, {load_after} after; total {timings['total_s']:.0f} s")

    write_results({
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "layer_sets": {name: LAYER_SETS[name] for name in args.layer_sets},
                     "index": "GradientIndexCallback defaults (float16 rows, float32, projected K-FAC curvature), "
                              "stages=[predict]; GradientIndex.scores default damping",
                     "pearson": "per query over the training rows, mean over queries",
                     "top_overlap": f"|top{TOP} ∩ top{TOP} of the exact| / {TOP} per query, mean over queries"},
        "retrain_key": retrain_key(args),
        "num_train": len(train_rows), "num_queries": len(query_rows), "subset_size": size,
        "retrained_from": source,
        "table": table,
        "index_timings": index_timings,
        "exact_pass_s": exact_pass,
        "build_s_range": [min(builds), max(builds)], "query_s_range": [min(queries), max(queries)],
        "timings": timings,
        "load_average": {"before": load_before, "after": load_after},
        "retrained_query_losses": actual.tolist(),
        "lit_attrib": {"commit": lit_attrib_commit(), "sources_sha256": lit_attrib_sources()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }, args.output)


if __name__ == "__main__":
    main()
