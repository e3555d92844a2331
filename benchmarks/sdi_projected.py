"""Step-decomposed influence (SDI) over checkpoints: SketchedGradCallback against step-decomposed-influence.

The script trains a looped transformer (``configs/looped_addition.yaml``'s sizes: one weight-tied
block of d_model 64, 4 heads, d_ff 128, applied 4 times) on 2-digit addition for ``--epochs`` epochs
of ``--train`` rows, saving ``--checkpoints`` Lightning checkpoints at evenly spaced epochs. Then, on
that model, those checkpoints and the same data (the training rows, unshuffled, and the first
``--queries`` validation rows as queries, both in batches of ``--batch-size``), with the block's 16
parameter tensors (q/k/v/o/up/down weights and biases, two LayerNorms) tracked and a fixed
``η = --eta`` per checkpoint on both sides, it computes

1. exact SDI: ``SketchedGradCallback(exact=True, dtype="float64")``, checked against the baseline's
   ``FullGradientTracInSDI`` (full per-sample gradients through Opacus, float32): relative difference,
   least-squares scale between the two and the rate at which their signs agree;
2. for each total sketch dimension ``m`` in ``--sketch-dims``: lit_attrib's
   ``SketchedGradCallback(sketch_dim=m)`` (one ``m``-dimensional sketch shared by all 16 tensors) and
   the baseline's ``ProjectedTracInSDI(projection_size=m // 16)`` (its projection size is *per
   parameter tensor*: 16 sketches of ``m / 16`` each, concatenated; the same total dimension ``m``):
   the wall time of each one's whole TracInCP pass over every checkpoint (ours: the whole
   ``Trainer.predict`` call, including writing its artifact; theirs: ``influence_across_checkpoints``),
   the ratio ours ÷ theirs (goal ≤ 0.5) and the Pearson correlation of each side's SDI
   ``(N_train, N_query, S)`` (flattened) and TracIn ``(N_train, N_query)`` with the exact ones (goal:
   ours ≥ theirs at every m);
3. profiles of one extra pass of each side at ``--profile-dim`` (theirs at ``projection_size =
   --profile-dim // 16``), to show where the time goes: cProfile (top functions by own and by
   cumulative time) of ours and of theirs, and torch.profiler's operators by self CPU time of ours
   (the kernels that autograd's backward runs are visible there only).

Each timed pass runs once (both sides are warmed up first on ``--warmup-examples`` training rows);
the same number of torch threads (``--threads``, default 1) serves both, and the load average is
recorded.

Run: ``python benchmarks/sdi_projected.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning
import sdi
import torch
from _common import lit_attrib_commit, lit_attrib_sources, profile_table, report_load, write_results
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lit_attrib.callbacks import SketchedGradCallback
from lit_attrib.data import AlgorithmicDataModule
from lit_attrib.modules import LoopedTransformerModule

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sdi_projected.json"
# configs/looped_addition.yaml's model
MODEL = {"vocab_size": 14, "d_model": 64, "n_heads": 4, "d_ff": 128, "n_loops": 4, "max_length": 16,
         "learning_rate": 3e-3, "warmup_steps": 50}
PARAMETER_TENSORS = 16  # q/k/v/o/up/down weight and bias, attn_norm and mlp_norm weight and bias


class BenchData(AlgorithmicDataModule):
    """AlgorithmicDataModule whose prediction set (the scored training rows) and query set can be cut to
    their first ``predict_limit`` and ``query_limit`` rows."""

    def __init__(self, *args, predict_limit: int | None = None, query_limit: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.predict_limit, self.query_limit = predict_limit, query_limit

    def predict_dataloader(self):
        rows = self.rows[: self.hparams.num_train][: self.predict_limit]
        return self._loader(rows, self.eval_batch_size, shuffle=False)

    def query_dataloader(self):
        rows = self.rows[self.hparams.num_train:][: self.query_limit]
        return self._loader(rows, self.eval_batch_size, shuffle=False)


def datamodule(args: argparse.Namespace, predict_limit: int | None = None) -> BenchData:
    data = BenchData(task="addition", digits=2, num_train=args.train, num_val=args.val, seed=0,
                     batch_size=args.train_batch_size, eval_batch_size=args.batch_size,
                     predict_limit=predict_limit, query_limit=args.queries)
    data.setup("predict")
    return data


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   **kwargs)


# ------------------------------------------------------------------------------------ training
def train(args: argparse.Namespace, folder: str) -> tuple[LoopedTransformerModule, list[str], dict]:
    """Train the looped model, saving ``args.checkpoints`` checkpoints at evenly spaced epochs."""
    seed_everything(0, verbose=False)
    module = LoopedTransformerModule(**MODEL)
    data = datamodule(args)
    every = max(1, args.epochs // args.checkpoints)
    saver = ModelCheckpoint(dirpath=folder, filename="{epoch}", every_n_epochs=every, save_top_k=-1, save_last=False)
    run = quiet_trainer(max_epochs=args.epochs, callbacks=[saver], limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    run.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    paths = sorted((str(p) for p in Path(folder).glob("epoch=*.ckpt")),
                   key=lambda p: int(Path(p).stem.split("=")[1]))[-args.checkpoints:]
    metrics = quiet_trainer(enable_checkpointing=False).validate(module, datamodule=data, verbose=False)[0]
    info = {"seconds": seconds, "epochs": args.epochs, "steps": run.global_step,
            "checkpoints": [Path(p).name for p in paths],
            "val_exact_match": float(metrics["val/exact_match"]), "val_loss": float(metrics["val/loss"])}
    return module, paths, info


# ------------------------------------------------------------------------------------ the two sides
def run_ours(module, data: BenchData, paths: list[str], eta: float, sketch_dim: int, folder: str,
             exact: bool = False, profile: cProfile.Profile | None = None, sharing: str = "shared") -> tuple[float, dict]:
    """Seconds of the whole ``Trainer.predict`` call with ``SketchedGradCallback``, and its results."""
    callback = SketchedGradCallback(target_modules=["block"], sketch_dim=sketch_dim, checkpoints=paths,
                                    eta=[eta] * len(paths), exact=exact, dtype="float64" if exact else "float32",
                                    keep_sketches=False, output_dir=folder, overwrite=True, plots=False,
                                    sketch_sharing=sharing)
    run = quiet_trainer(enable_checkpointing=False, callbacks=[callback])
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    run.predict(module, datamodule=data, return_predictions=False)
    if profile is not None:
        profile.disable()
    seconds = time.perf_counter() - start
    saved = load_file(f"{folder}/sdi.safetensors")
    return seconds, {"sdi": saved["sdi"].double(), "tracin": saved["tracin"].double(),
                     "train_indices": saved["train_indices"], "query_indices": saved["query_indices"]}


def run_theirs(module, data: BenchData, paths: list[str], eta: float, projection_size: int | None,
               profile: cProfile.Profile | None = None) -> tuple[float, dict]:
    """Seconds of ``influence_across_checkpoints`` of ``ProjectedTracInSDI(projection_size)`` (``None``:
    ``FullGradientTracInSDI``), and its results. The estimator's hooks are removed afterwards."""
    if projection_size is None:
        estimator = sdi.FullGradientTracInSDI(model=module, target_modules=[module.block], loss_reduction="sum")
    else:
        estimator = sdi.ProjectedTracInSDI(model=module, target_modules=[module.block], projection_size=projection_size,
                                           seed=0, loss_reduction="sum")
    try:
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        out = estimator.influence_across_checkpoints(
            checkpoints=[sdi.CheckpointSpec(path, eta) for path in paths],
            train_loader=data.predict_dataloader(), query_loader=data.query_dataloader(),
            loss_fn=lambda model, batch: model.per_example_loss(batch), mode="sdi")
        if profile is not None:
            profile.disable()
        seconds = time.perf_counter() - start
    finally:
        estimator.close()
    # both loaders are unshuffled: rows and columns are in dataset index order
    train_indices = torch.cat([b["index"] for b in data.predict_dataloader()])
    query_indices = torch.cat([b["index"] for b in data.query_dataloader()])
    return seconds, {"sdi": out.sdi.double(), "tracin": out.tracin.double(), "train_indices": train_indices,
                     "query_indices": query_indices}


# ------------------------------------------------------------------------------------ comparison
def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def check_aligned(a: dict, b: dict) -> None:
    if not (torch.equal(a["train_indices"], b["train_indices"]) and torch.equal(a["query_indices"], b["query_indices"])):
        raise RuntimeError("the two results cover different training examples or queries, or another order")


def agreement(reference: dict, other: dict) -> dict:
    """How ``other`` matches ``reference`` (both ``sdi`` and ``tracin``)."""
    check_aligned(reference, other)
    out = {}
    for key in ("sdi", "tracin"):
        a, b = reference[key], other[key]
        nonzero = (a != 0) & (b != 0)
        out[key] = {
            "pearson": pearson(a, b),
            "max_abs_diff_over_max_abs": float((a - b).abs().max() / a.abs().max()),
            "frobenius_relative": float(torch.linalg.norm(a - b) / torch.linalg.norm(a)),
            "least_squares_scale": float((a.flatten() @ b.flatten()) / (a.flatten() @ a.flatten())),
            "sign_agreement": float((torch.sign(a) == torch.sign(b))[nonzero].double().mean()),
        }
    return out



def print_report(results: dict) -> None:
    s = results["settings"]
    t = results["training"]
    print(f"\nLooped transformer (d_model 64, 4 loops), 2-digit addition: trained {t['epochs']} epochs on {s['train']} rows "
          f"in {t['seconds']:.0f} s (val exact match {t['val_exact_match']:.3f}); {len(t['checkpoints'])} checkpoints, "
          f"η = {s['eta']} each")
    print(f"SDI of {s['train']} training rows × {s['queries']} queries × {results['steps']} steps, batches of "
          f"{s['batch_size']}, {s['threads']} torch threads; block: {PARAMETER_TENSORS} parameter tensors, "
          f"{results['tracked_parameters']:,} parameters")
    e = results["exact"]
    print(f"\nexact: ours (float64) {e['ours_s']:.1f} s, baseline FullGradientTracInSDI (float32) "
          f"{e.get('theirs_s', float('nan')):.1f} s")
    for key in ("sdi", "tracin") if "agreement" in e else ():
        a = e["agreement"][key]
        print(f"  {key:<7} pearson {a['pearson']:.8f}  max rel {a['max_abs_diff_over_max_abs']:.2e}  "
              f"frob rel {a['frobenius_relative']:.2e}  scale theirs/ours {a['least_squares_scale']:.6f}  "
              f"sign agreement {a['sign_agreement']:.4%}")
    print(f"\n{'total m':>8}{'ours m':>8}{'theirs p×16':>13}{'ours s':>9}{'theirs s':>10}{'ratio':>8}"
          f"{'r sdi ours':>12}{'r sdi theirs':>14}{'r tracin ours':>15}{'r tracin theirs':>17}")
    for row in results["projected"]:
        print(f"{row['total_sketch_dim']:>8}{row['ours_sketch_dim']:>8}{row['theirs_projection_size']:>9}×16"
              f"{row['ours_s']:>9.2f}{row['theirs_s']:>10.2f}{row['time_ratio']:>8.3f}"
              f"{row['ours_vs_exact']['sdi']['pearson']:>12.4f}{row['theirs_vs_exact']['sdi']['pearson']:>14.4f}"
              f"{row['ours_vs_exact']['tracin']['pearson']:>15.4f}{row['theirs_vs_exact']['tracin']['pearson']:>17.4f}")
    print("goals: ratio ours ÷ theirs ≤ 0.5; Pearson with the exact SDI ours ≥ theirs at every m "
          "(theirs' projection_size p is per parameter tensor: total dimension 16·p = m)")
    if "profile" in results:
        p = results["profile"]
        print(f"\nprofile of ours at m = {p['sketch_dim']} ({p['seconds']:.2f} s under cProfile), top by own time:")
        for row in p["by_tottime"][:15]:
            print(f"  {row['tottime_s']:>8.3f} s own {row['cumtime_s']:>8.3f} s cum {row['calls']:>8}  {row['function']}")
        t = p["torch_profiler"]
        print(f"torch.profiler, ours at m = {p['sketch_dim']} ({t['seconds']:.2f} s profiled), top operators by self CPU:")
        for row in t["by_self_cpu"][:15]:
            print(f"  {row['self_cpu_s']:>8.3f} s self {row['cpu_total_s']:>8.3f} s total {row['calls']:>8}  {row['op']}")
    report_load(results["load_average_1min"], s["threads"])


SOURCES = lit_attrib_sources()  # at import, next to the import of lit_attrib itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=1000, help="training rows (trained on and scored)")
    parser.add_argument("--val", type=int, default=300, help="validation rows (held out)")
    parser.add_argument("--queries", type=int, default=32, help="queries: the first validation rows")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints saved (evenly spaced epochs)")
    parser.add_argument("--train-batch-size", type=int, default=32, help="batch size of training")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both SDI passes")
    parser.add_argument("--eta", type=float, default=3e-3, help="η of every checkpoint, both sides")
    parser.add_argument("--sketch-dims", type=int, nargs="+", default=[256, 1024, 4096],
                        help="total sketch dimensions m (theirs: projection_size m // 16)")
    parser.add_argument("--profile-dim", type=int, default=1024, help="m of the profiled passes (0: none)")
    parser.add_argument("--warmup-examples", type=int, default=64, help="training rows of the warm-up runs")
    parser.add_argument("--skip-full-gradient", action="store_true",
                        help="do not run the baseline's FullGradientTracInSDI")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both sides (2 threads on 2 cores that other processes also use can be "
                             "100 times slower per operation than 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes of each side per m, interleaved (ours, theirs, ours, ...); medians count "
                             "(single passes of ~2 s vary by up to ±40%% on this machine)")
    parser.add_argument("--sharing", choices=["shared", "split"], default="shared",
                        help="SketchedGradCallback's sketch_sharing: every module in all m coordinates, or each in its "
                             "own m_b ∝ its parameters")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(m % PARAMETER_TENSORS for m in args.sketch_dims):
        parser.error(f"every --sketch-dims value must be a multiple of {PARAMETER_TENSORS}")
    if args.queries > args.val:
        parser.error("--queries must not exceed --val")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
    warnings.filterwarnings("ignore", message=".*(full_backward_hook|Full backward hook).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "model": MODEL,
                     "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                                  "step_decomposed_influence": _version("step-decomposed-influence"),
                                  "opacus": _version("opacus"), "lit_attrib_commit": lit_attrib_commit(),
                                  "lit_attrib_sources_sha256": SOURCES}}
    with tempfile.TemporaryDirectory() as folder:
        module, paths, results["training"] = train(args, f"{folder}/checkpoints")
        print(f"trained in {results['training']['seconds']:.1f} s: {results['training']}", flush=True)
        data, warmup = datamodule(args), datamodule(args, predict_limit=args.warmup_examples)
        results["tracked_parameters"] = sum(p.numel() for p in module.block.parameters())

        # 1. exact SDI, ours and the baseline's full per-sample gradients
        seconds_ours, exact = run_ours(module, data, paths, args.eta, 1, f"{folder}/exact", exact=True)
        results["steps"] = exact["sdi"].shape[-1]
        results["exact"] = {"ours_s": seconds_ours, "shape": list(exact["sdi"].shape)}
        print(f"exact (ours): {seconds_ours:.1f} s", flush=True)
        if not args.skip_full_gradient:
            seconds, full = run_theirs(module, data, paths, args.eta, None)
            results["exact"].update(theirs_s=seconds, agreement=agreement(exact, full))
            print(f"exact (theirs): {seconds:.1f} s, {results['exact']['agreement']}", flush=True)

        # 2. sketches of the same total dimension: each side's passes timed after a warm-up of each side
        run_ours(module, warmup, paths, args.eta, args.sketch_dims[0], f"{folder}/warmup")
        run_theirs(module, warmup, paths, args.eta, args.sketch_dims[0] // PARAMETER_TENSORS)
        results["projected"] = []
        for m in args.sketch_dims:
            p = m // PARAMETER_TENSORS
            times_ours, times_theirs = [], []
            for _ in range(args.repeats):
                seconds, ours = run_ours(module, data, paths, args.eta, m, f"{folder}/ours_{m}", sharing=args.sharing)
                times_ours.append(seconds)
                seconds, theirs = run_theirs(module, data, paths, args.eta, p)
                times_theirs.append(seconds)
            seconds_ours, seconds_theirs = statistics.median(times_ours), statistics.median(times_theirs)
            row = {"total_sketch_dim": m, "ours_sketch_dim": m, "theirs_projection_size": p,
                   "theirs_total_dim": p * PARAMETER_TENSORS, "ours_s": seconds_ours, "theirs_s": seconds_theirs,
                   "ours_runs_s": times_ours, "theirs_runs_s": times_theirs,
                   "time_ratio": seconds_ours / seconds_theirs,
                   "ours_vs_exact": agreement(exact, ours), "theirs_vs_exact": agreement(exact, theirs)}
            if not args.skip_full_gradient:
                row["theirs_vs_their_full_gradient"] = agreement(full, theirs)
            results["projected"].append(row)
            print(f"m={m}: ours {seconds_ours:.2f} s, theirs {seconds_theirs:.2f} s, ratio {row['time_ratio']:.3f}; "
                  f"pearson sdi ours {row['ours_vs_exact']['sdi']['pearson']:.4f} theirs "
                  f"{row['theirs_vs_exact']['sdi']['pearson']:.4f}", flush=True)

        # 3. where the time goes
        if args.profile_dim:
            profile = cProfile.Profile()
            seconds, _ = run_ours(module, data, paths, args.eta, args.profile_dim, f"{folder}/profile", profile=profile)
            results["profile"] = {"sketch_dim": args.profile_dim, "tool": "cProfile", "seconds": seconds,
                                  "by_tottime": profile_table(profile, "tottime_s", 15),
                                  "by_cumtime": profile_table(profile, "cumtime_s", 30)}
            profile = cProfile.Profile()
            seconds, _ = run_theirs(module, data, paths, args.eta, args.profile_dim // PARAMETER_TENSORS, profile=profile)
            results["profile_theirs"] = {"projection_size": args.profile_dim // PARAMETER_TENSORS, "tool": "cProfile",
                                         "seconds": seconds, "by_tottime": profile_table(profile, "tottime_s", 15),
                                         "by_cumtime": profile_table(profile, "cumtime_s", 30)}
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                seconds, _ = run_ours(module, data, paths, args.eta, args.profile_dim, f"{folder}/torch_profile")
            results["profile"]["torch_profiler"] = {"seconds": seconds, "by_self_cpu": [
                {"op": event.key, "calls": event.count, "self_cpu_s": round(event.self_cpu_time_total / 1e6, 4),
                 "cpu_total_s": round(event.cpu_time_total / 1e6, 4)}
                for event in sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:20]]}
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    print_report(results)
    write_results(results, args.output)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
