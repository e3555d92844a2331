"""Query latency of a gradient index at 10⁵ and 10⁶ rows: exact (streamed) search against the machine's
streaming bandwidth, and FAISS approximate search (p50 and recall@10 against exact).

The rows are synthetic, written in the index's own format (``rows-rank000.npy`` float16, ids, a K-FAC
curvature, ``index.json``) and opened with :class:`lit_attrib.index.GradientIndex`, so the searches run
exactly as ``lit-attrib index-query`` runs them. Their width defaults to the quickstart model's at the
default ``projection_dim`` (6 MLP projections × 32 × 32 = 6144 values). They are structured like
gradients rather than isotropic noise: low rank (64 latent directions) in 256 clusters, with per-row
scales and full-width noise; the queries are drawn the same way. Approximate recall depends on that
structure: on real gradients, measure it with ``GradientIndex.search(..., approximate=True)`` against
the exact search.

Each single-query search is timed separately (p50, p99 over ``--queries`` of them); the bandwidth is the
time to stream the same memory-mapped file through a sum (numpy, one thread; and torch, ``--threads``),
measured in the same run, interleaved with the searches, and the exact search's rate is reported as a
fraction of the better of the two.

Run (about 5 minutes on 2 CPU cores, 12.3 GB of disk at 10⁶ rows; ``--keep`` reuses the files)::

    python benchmarks/index_query_latency.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lit_attrib_commit, report_load, write_results

import lit_attrib.index
from lit_attrib.artifacts.index import shard_names, write_curvature, write_metadata, write_norms
from lit_attrib.index import GradientIndex

LAYERS = [f"model.model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="index sizes")
    parser.add_argument("--width", type=int, default=6144, help="values per row (a multiple of 6 · 32 · 32 / 32)")
    parser.add_argument("--queries", type=int, default=20, help="single-query searches timed per size")
    parser.add_argument("--batch", type=int, default=32, help="queries of the one batched search per size")
    parser.add_argument("--k", type=int, default=10, help="hits per query")
    parser.add_argument("--rank", type=int, default=64, help="latent directions of the synthetic rows")
    parser.add_argument("--clusters", type=int, default=256, help="clusters of the synthetic rows")
    parser.add_argument("--noise", type=float, default=0.3, help="full-width noise of the synthetic rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the searches")
    parser.add_argument("--block_rows", type=int, default=None, help="rows per streamed block (default: 8 MB)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="FAISS lists visited per query")
    parser.add_argument("--no_faiss", action="store_true", help="skip approximate search")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/lit_attrib_index_bench"), help="where the rows go")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic indexes")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "index_query_latency.json")
    return parser.parse_args()


def _sizes(width: int) -> dict[str, tuple[int, int]]:
    """Six layers of ``k_out × k_in`` blocks adding up to ``width``."""
    per_layer, rest = divmod(width, len(LAYERS))
    k_in = int(np.sqrt(per_layer))
    while per_layer % k_in:
        k_in -= 1
    if rest:
        raise SystemExit(f"--width must be a multiple of {len(LAYERS)}; got {width}")
    return {name: (per_layer // k_in, k_in) for name in LAYERS}


class _Synthetic:
    """Gradient-like rows: ``scale · (centre_c + 0.5 ε) Bᵀ / sqrt(r) + noise · ν``, r latent directions."""

    def __init__(self, width: int, seed: int = 0, rank: int = 64, clusters: int = 256, noise: float = 0.3) -> None:
        generator = np.random.default_rng(seed)
        self.basis = generator.standard_normal((rank, width), dtype=np.float32)
        self.centres = generator.standard_normal((clusters, rank), dtype=np.float32) * 2.0
        self.rank, self.noise = rank, noise

    def draw(self, count: int, generator: np.random.Generator) -> np.ndarray:
        cluster = generator.integers(0, len(self.centres), count)
        latent = self.centres[cluster] + 0.5 * generator.standard_normal((count, self.rank), dtype=np.float32)
        scale = np.exp(0.3 * generator.standard_normal((count, 1), dtype=np.float32))
        rows = scale * (latent @ self.basis) / np.sqrt(self.rank)
        rows += self.noise * generator.standard_normal(rows.shape, dtype=np.float32)
        return rows


def _write_index(folder: Path, count: int, width: int, synthetic: _Synthetic) -> float:
    """A float16 index of ``count`` synthetic rows in ``folder``; returns the seconds it took."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(width)
    rows = np.lib.format.open_memmap(folder / "rows-rank000.npy", mode="w+", dtype=np.float16, shape=(count, width))
    generator = np.random.default_rng(1)
    for start in range(0, count, 8192):
        rows[start:start + 8192] = synthetic.draw(min(8192, count - start), generator)
    rows.flush()
    del rows
    np.save(folder / "ids-rank000.npy", np.arange(count, dtype=np.int64))
    write_norms(folder / "norms-rank000.npy", np.load(folder / "rows-rank000.npy", mmap_mode="r"))
    curvature, generator = {}, torch.Generator().manual_seed(2)
    for name, (k_out, k_in) in sizes.items():
        for side, size in (("activation", k_in), ("gradient", k_out)):
            curvature[f"{name}.{side}_eigenvalues"] = torch.rand(size, generator=generator, dtype=torch.float64) + 0.1
            curvature[f"{name}.{side}_eigenvectors"] = torch.linalg.qr(
                torch.randn(size, size, generator=generator, dtype=torch.float64))[0]
    write_curvature(folder, curvature)
    write_metadata(folder, {
        "name": "synthetic", "arguments": {"projection_dim": max(max(s) for s in sizes.values()), "seed": 0},
        "collection": {"stage": "synthetic"},
        "layers": {name: {"kind": "linear", "gradient_shape": [k_out * 8, k_in * 3], "k_out": k_out, "k_in": k_in}
                   for name, (k_out, k_in) in sizes.items()},
        "seed": 0, "width": width, "storage_dtype": "float16", "shards": [shard_names(0)],
    })
    return time.perf_counter() - started


def _stream_numpy(rows: np.ndarray, block: int) -> float:
    """Seconds to read every byte of the memory map once through a numpy sum (one thread)."""
    started = time.perf_counter()
    for start in range(0, len(rows), block):
        np.asarray(rows[start:start + block]).view(np.float32).sum()
    return time.perf_counter() - started


def _stream_torch(rows: np.ndarray, block: int) -> float:
    """The same through a torch sum (torch's threads)."""
    started = time.perf_counter()
    for start in range(0, len(rows), block):
        torch.from_numpy(np.asarray(rows[start:start + block]).view(np.float32)).sum()
    return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _measure(folder: Path, count: int, args: argparse.Namespace, synthetic: _Synthetic) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    index = GradientIndex(folder)
    nbytes = count * args.width * 2
    generator = np.random.default_rng(3)
    queries = torch.from_numpy(synthetic.draw(args.queries, generator)).double()
    batch = torch.from_numpy(synthetic.draw(args.batch, generator)).double()
    memmap = index._shards[0]
    stream_block = 1 << 14
    _stream_numpy(memmap, stream_block)  # warm the page cache (as far as it holds the file)
    exact_seconds, numpy_seconds, torch_seconds, converted_seconds = [], [], [], []
    half_queries = lit_attrib.index.HALF_QUERIES
    for q in range(args.queries):  # interleaved: the bandwidth is measured under the same conditions
        numpy_seconds.append(_stream_numpy(memmap, stream_block))
        torch_seconds.append(_stream_torch(memmap, stream_block))
        result = index.search(queries[q:q + 1], k=args.k, block_rows=args.block_rows)
        exact_seconds.append(result.seconds)
        lit_attrib.index.HALF_QUERIES = 0  # the same query through the float32 conversion path, for comparison
        converted = index.search(queries[q:q + 1], k=args.k, block_rows=args.block_rows)
        lit_attrib.index.HALF_QUERIES = half_queries
        converted_seconds.append(converted.seconds)
        assert converted.ids.tolist() == result.ids.tolist(), "the float16 and float32 paths disagree"
    started = time.perf_counter()
    exact_batch = index.search(batch, k=args.k, block_rows=args.block_rows)
    batch_seconds = time.perf_counter() - started
    bandwidth = {"numpy_1_thread": nbytes / statistics.median(numpy_seconds) / 1e9,
                 f"torch_{args.threads}_threads": nbytes / statistics.median(torch_seconds) / 1e9}
    best = max(bandwidth.values())
    p50, p99 = statistics.median(exact_seconds), _percentile(exact_seconds, 0.99)
    out = {"rows": count, "width": args.width, "bytes": nbytes, "bandwidth_gb_s": bandwidth,
           "exact": {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "gb_s_at_p50": nbytes / p50 / 1e9,
                     "fraction_of_bandwidth": nbytes / p50 / 1e9 / best,
                     "float32_path_p50_ms": 1e3 * statistics.median(converted_seconds),
                     "float32_path_fraction_of_bandwidth": nbytes / statistics.median(converted_seconds) / 1e9 / best,
                     f"batch_{args.batch}_s": batch_seconds,
                     "batch_ms_per_query": 1e3 * batch_seconds / args.batch}}
    print(f"\n{count:,} rows × {args.width} float16 ({nbytes / 1e9:.2f} GB)")
    print(f"  streaming bandwidth: numpy sum {bandwidth['numpy_1_thread']:.2f} GB/s (1 thread), torch sum "
          f"{bandwidth[f'torch_{args.threads}_threads']:.2f} GB/s ({args.threads} thread(s))")
    print(f"  exact search, 1 query: p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms ({len(exact_seconds)} queries); "
          f"{nbytes / p50 / 1e9:.2f} GB/s = {out['exact']['fraction_of_bandwidth']:.2f} of the bandwidth")
    print(f"  (the same queries through the float32 conversion path: p50 "
          f"{out['exact']['float32_path_p50_ms']:.1f} ms = {out['exact']['float32_path_fraction_of_bandwidth']:.2f} of "
          f"the bandwidth)")
    print(f"  exact search, {args.batch} queries at once: {batch_seconds:.2f} s "
          f"({1e3 * batch_seconds / args.batch:.1f} ms per query)")
    if args.no_faiss:
        return out
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("  approximate search: skipped (pip install 'lit-attrib[faiss]')")
        return out
    torch.set_num_threads(os.cpu_count() or 1)  # the one-off build uses every core
    started = time.perf_counter()
    approximate = index.approximate_index(rebuild=True)
    build = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    out["approximate"] = {"build_s": build, "lists": int(approximate.index.nlist),
                          "dim": int(approximate.basis.shape[1]), "runs": []}
    print(f"  FAISS index: {approximate.index.nlist} lists over {approximate.basis.shape[1]} principal directions, "
          f"built in {build:.1f} s (once; cached next to the index)")
    for nprobe in args.nprobe:
        seconds, recall = [], []
        for q in range(args.batch):
            result = index.search(batch[q:q + 1], k=args.k, approximate=True, nprobe=nprobe)
            seconds.append(result.seconds)
            found = set(result.ids[0].tolist())
            recall.append(len(found & set(exact_batch.ids[q].tolist())) / args.k)
        run = {"nprobe": nprobe, "p50_ms": 1e3 * statistics.median(seconds),
               "p99_ms": 1e3 * _percentile(seconds, 0.99), f"recall_at_{args.k}": float(np.mean(recall))}
        out["approximate"]["runs"].append(run)
        print(f"  approximate search (nprobe {nprobe}): p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
              f"recall@{args.k} {run[f'recall_at_{args.k}']:.3f} against exact ({args.batch} queries)")
    return out


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    synthetic = _Synthetic(args.width, rank=args.rank, clusters=args.clusters, noise=args.noise)
    shape = "" if (args.rank, args.clusters, args.noise) == (64, 256, 0.3) else \
        f"-rank{args.rank}-clusters{args.clusters}-noise{args.noise:g}"
    needed = max(args.rows) * args.width * 2
    args.folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.folder).free
    if free < 1.2 * needed:
        raise SystemExit(f"{args.folder} has {free / 1e9:.1f} GB free; {max(args.rows):,} rows of width {args.width} "
                         f"need {needed / 1e9:.1f} GB: choose --folder, --rows or --width")
    load_before = os.getloadavg()[0]
    results = {"commit": lit_attrib_commit(), "torch": torch.__version__, "threads": args.threads,
               "cpus": os.cpu_count(), "synthetic": {"rank": args.rank, "clusters": args.clusters, "noise": args.noise},
               "sizes": []}
    for count in args.rows:
        folder = args.folder / f"rows{count}-width{args.width}{shape}"
        if not (args.keep and (folder / "index.json").is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"writing {count:,} synthetic rows to {folder} ...", flush=True)
            print(f"  written in {_write_index(folder, count, args.width, synthetic):.0f} s")
        results["sizes"].append(_measure(folder, count, args, synthetic))
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    results["load_average"] = load
    report_load(load, os.cpu_count() or 1)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
