"""Online step-decomposed influence: the cost of SketchedGradCallback during Trainer.fit.

The looped transformer of ``configs/looped_addition.yaml`` (one weight-tied block applied 4 times,
4 heads; AdamW, lr 3e-3, 50 warmup steps), at every width ``d_model`` in ``--d-model`` (with
``d_ff = 2·d_model``; the config's model is d_model 64), is fitted on 2-digit addition for
``--max-steps`` optimizer steps (0: ``--epochs`` whole epochs) over ``--train`` rows in batches of
``--batch-size`` (no validation, no checkpointing, no logger, progress bar off), once with
``SketchedGradCallback(target_modules=["block"], sketch_dim=--sketch-dim, every_n_steps=k)`` (online
mode: the training backward's sketches come for free, the first ``N_q`` validation rows are sketched
again every ``k`` optimizer steps) and once without it, for every width, every ``N_q`` in
``--queries`` and ``k`` in ``--every``. The queries are cut with a datamodule whose ``query_dataloader()`` yields only the first
``N_q`` validation rows (in batches of ``--batch-size``).

Reported per configuration: the wall time of the whole ``Trainer.fit`` with the callback ÷ without
(goal ≤ 1.3; it includes the callback's set-up and the artifact it writes at the end, without
``trajectories.png`` unless ``--plots``), and the same
ratio of the training loop alone (first to last batch start, so without start-up and writing: the
per-step cost, query refreshes included). Each configuration runs ``--repeats`` interleaved pairs
(without, with, without, with, …), every fit from the same initial weights and the same seeded batch
order, and the medians count. The load average is recorded. Last, at every width, one more fit with
the callback (the first ``N_q``, the last ``k``) runs under cProfile, whose top functions go to the
JSON too, with the train-side sketch route (explicit per-example product or FFT, by
``TensorSketch.explicit_is_cheaper``) that each linear layer took in it.

Run: ``python benchmarks/sdi_online.py`` (``--help`` for the options).
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
from typing import Self

import lightning
import torch
from _common import lit_attrib_commit, lit_attrib_sources, profile_table, report_load, write_results
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_attrib.callbacks import SketchedGradCallback
from lit_attrib.data import AlgorithmicDataModule
from lit_attrib.modules import LoopedTransformerModule
from lit_attrib.ops.sketch import TensorSketch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sdi_online.json"
# configs/looped_addition.yaml's model; d_model (and d_ff = 2·d_model) set per width by model_config()
MODEL = {"vocab_size": 14, "d_model": 64, "n_heads": 4, "d_ff": 128, "n_loops": 4, "max_length": 16,
         "learning_rate": 3e-3, "warmup_steps": 50}


def model_config(d_model: int) -> dict:
    """configs/looped_addition.yaml's model at width ``d_model``: d_ff = 2·d_model, 4 heads."""
    return {**MODEL, "d_model": d_model, "d_ff": 2 * d_model, "n_heads": 4}


class QueryLimitedData(AlgorithmicDataModule):
    """AlgorithmicDataModule whose ``query_dataloader()`` yields only the first ``query_limit`` validation rows."""

    def __init__(self, *args, query_limit: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.query_limit = query_limit

    def query_dataloader(self):
        return self._loader(self.rows[self.hparams.num_train:][: self.query_limit], self.eval_batch_size, shuffle=False)


class BatchClock(Callback):
    """Times every training batch start (placed first among the callbacks, so before the SDI callback's)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def fit(args: argparse.Namespace, d_model: int, queries: int, every: int | None, folder: str,
        profile: cProfile.Profile | None = None, max_steps: int | None = None) -> dict:
    """One fit at width ``d_model`` from the same initial weights and batch order; ``every=None``: without
    the callback. ``max_steps``: instead of ``args.max_steps`` (the warm-ups)."""
    seed_everything(0, verbose=False)
    module = LoopedTransformerModule(**model_config(d_model))
    data = QueryLimitedData(task="addition", digits=2, num_train=args.train, num_val=args.val, seed=0,
                            batch_size=args.batch_size, query_limit=queries)
    clock = BatchClock()
    callbacks: list[Callback] = [clock]
    if every is not None:
        callbacks.append(SketchedGradCallback(target_modules=["block"], sketch_dim=args.sketch_dim,
                                              every_n_steps=every, output_dir=folder, overwrite=True,
                                              plots=args.plots, sketch_sharing=args.sharing))
    steps = args.max_steps if max_steps is None else max_steps
    length = {"max_steps": steps, "max_epochs": -1} if steps > 0 else {"max_epochs": args.epochs}
    trainer = Trainer(accelerator="cpu", devices=1, **length, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    trainer.fit(module, datamodule=data)
    if profile is not None:
        profile.disable()
    seconds = time.perf_counter() - start
    steps = len(clock.starts)  # training batches started
    return {"fit_s": seconds, "loop_s": clock.starts[-1] - clock.starts[0], "steps": steps,
            "global_step": trainer.global_step}



class RouteTally:
    """Counts, while active, the decisions of ``TensorSketch.explicit_is_cheaper`` per ``out × in`` shape
    (the FFT route asks twice: once per module's stacked uses, once in ``outer``)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict] = {}
        self.original = TensorSketch.explicit_is_cheaper

    def __enter__(self) -> Self:
        original, counts = self.original, self.counts

        def tallied(sketch, tokens: int, out_features: int, in_features: int) -> bool:
            explicit = original(sketch, tokens, out_features, in_features)
            entry = counts.setdefault(f"{out_features}x{in_features}", {"explicit": 0, "fft": 0, "tokens_min": tokens,
                                                                          "tokens_max": tokens})
            entry["explicit" if explicit else "fft"] += 1
            entry["tokens_min"], entry["tokens_max"] = min(entry["tokens_min"], tokens), max(entry["tokens_max"], tokens)
            return explicit

        TensorSketch.explicit_is_cheaper = tallied
        return self

    def __exit__(self, *exc) -> None:
        TensorSketch.explicit_is_cheaper = self.original




def print_table(results: dict) -> None:
    s = results["settings"]
    rows = results["configurations"]
    length = (f"{s['max_steps']} steps" if s["max_steps"] > 0 else f"{s['epochs']} epochs")
    print(f"\nTrainer.fit of the looped transformer (4 heads, d_ff = 2·d_model, 4 loops), {length} over {s['train']} "
          f"rows in batches of {s['batch_size']} ({rows[0]['steps']} steps), {s['threads']} torch threads, "
          f"SketchedGradCallback(sketch_dim={s['sketch_dim']}, sketch_sharing={s['sharing']}); medians of {s['repeats']} interleaved pairs")
    print(f"{'d_model':>8}{'N_q':>5}{'every':>7}{'without s':>11}{'with s':>9}{'fit ratio':>11}{'loop ratio':>12}"
          f"{'ms/step without':>17}{'ms/step with':>14}")
    for row in rows:
        print(f"{row['d_model']:>8}{row['queries']:>5}{row['every_n_steps']:>7}{row['without_fit_s']:>11.2f}"
              f"{row['with_fit_s']:>9.2f}{row['fit_ratio']:>11.3f}{row['loop_ratio']:>12.3f}"
              f"{row['without_ms_per_step']:>17.1f}{row['with_ms_per_step']:>14.1f}")
    print("goal: fit with ÷ without ≤ 1.3 (fit ratio: the whole Trainer.fit; loop ratio: first to last batch start)")
    for p in results.get("profiles", []):
        print(f"\nprofile of a fit with the callback (d_model = {p['d_model']}, N_q = {p['queries']}, every "
              f"{p['every_n_steps']} steps; {p['fit_s']:.2f} s under cProfile), train-side sketch route per linear "
              f"layer (out x in: decisions explicit/fft, tokens): "
              + ", ".join(f"{shape}: {r['explicit']}/{r['fft']}, {r['tokens_min']}-{r['tokens_max']}"
                          for shape, r in p["sketch_routes"].items()))
        print("top by own time:")
        for row in p["by_tottime"][:15]:
            print(f"  {row['tottime_s']:>8.3f} s own {row['cumtime_s']:>8.3f} s cum {row['calls']:>8}  {row['function']}")
    report_load(results["load_average_1min"], s["threads"])


SOURCES = lit_attrib_sources()  # at import, next to the import of lit_attrib itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=3000, help="training rows")
    parser.add_argument("--val", type=int, default=300, help="validation rows (the queries are the first ones)")
    parser.add_argument("--d-model", type=int, nargs="+", default=[64, 256, 1024],
                        help="widths of the looped model (d_ff = 2·d_model, 4 heads)")
    parser.add_argument("--max-steps", type=int, default=20,
                        help="optimizer steps per fit (0: --epochs epochs); a width-1024 step takes ~1.6 s on 1 thread")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit, only with --max-steps 0")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="optimizer steps of the warm-up fits (one without, one with the callback) per width")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of training and of the queries")
    parser.add_argument("--sketch-dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, nargs="+", default=[32, 128], help="query-set sizes N_q")
    parser.add_argument("--every", type=int, nargs="+", default=[10, 50], help="every_n_steps values k")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved (without, with) pairs per configuration")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (2 threads on 2 cores that other processes also use can be 100 times "
                             "slower per operation than 1)")
    parser.add_argument("--plots", action="store_true",
                        help="let the callback draw trajectories.png at the end of each fit (off: plots=False, as in "
                             "sdi_projected.py; the drawing is a fixed cost that short fits would feel)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled fits")
    parser.add_argument("--sharing", choices=["shared", "split"], default="shared",
                        help="SketchedGradCallback's sketch_sharing: every module in all m coordinates, or each in its "
                             "own m_b ∝ its parameters")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if max(args.queries) > args.val:
        parser.error("--queries must not exceed --val")
    if any(d % 4 for d in args.d_model):
        parser.error("every --d-model value must be a multiple of 4 (the number of heads)")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck|LeafSpec).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "models": {str(d): model_config(d) for d in args.d_model},
                     "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                                  "lit_attrib_commit": lit_attrib_commit(),
                                  "lit_attrib_sources_sha256": SOURCES},
                     "configurations": []}
    results["profiles"] = []
    with tempfile.TemporaryDirectory() as folder:
        for d_model in args.d_model:
            fit(args, d_model, args.queries[0], None, folder, max_steps=args.warmup_steps)  # warm-up of both
            fit(args, d_model, args.queries[0], args.every[-1], f"{folder}/warmup", max_steps=args.warmup_steps)
            config = model_config(d_model)
            probe = LoopedTransformerModule(**config)
            tracked = sum(p.numel() for p in probe.block.parameters())
            for queries in args.queries:
                for every in args.every:
                    runs: dict[str, list[dict]] = {"without": [], "with": []}
                    for repeat in range(args.repeats):
                        runs["without"].append(fit(args, d_model, queries, None, folder))
                        runs["with"].append(fit(args, d_model, queries, every,
                                                f"{folder}/sdi_{d_model}_{queries}_{every}_{repeat}"))
                    median = {side: {key: statistics.median(r[key] for r in values) for key in ("fit_s", "loop_s")}
                              for side, values in runs.items()}
                    steps = runs["with"][0]["steps"]
                    row = {"d_model": d_model, "d_ff": config["d_ff"], "n_heads": config["n_heads"],
                           "tracked_parameters": tracked, "queries": queries, "every_n_steps": every, "steps": steps,
                           "query_refreshes": -(-steps // every),
                           "without_fit_s": median["without"]["fit_s"], "with_fit_s": median["with"]["fit_s"],
                           "fit_ratio": median["with"]["fit_s"] / median["without"]["fit_s"],
                           "loop_ratio": median["with"]["loop_s"] / median["without"]["loop_s"],
                           "without_ms_per_step": 1000 * median["without"]["loop_s"] / (steps - 1),
                           "with_ms_per_step": 1000 * median["with"]["loop_s"] / (steps - 1),
                           "runs": runs}
                    results["configurations"].append(row)
                    print(f"d_model={d_model} N_q={queries} every={every}: fit {row['without_fit_s']:.2f} s without, "
                          f"{row['with_fit_s']:.2f} s with: ratio {row['fit_ratio']:.3f} (loop {row['loop_ratio']:.3f}; "
                          f"{row['without_ms_per_step']:.1f} / {row['with_ms_per_step']:.1f} ms per step)", flush=True)
            if not args.no_profile:
                profile = cProfile.Profile()
                with RouteTally() as tally:
                    run = fit(args, d_model, args.queries[0], args.every[-1], f"{folder}/profile_{d_model}",
                              profile=profile)
                results["profiles"].append({
                    "d_model": d_model, "queries": args.queries[0], "every_n_steps": args.every[-1],
                    "tool": "cProfile", "fit_s": run["fit_s"], "steps": run["steps"], "sketch_routes": tally.counts,
                    "by_tottime": profile_table(profile, "tottime_s", 15),
                    "by_cumtime": profile_table(profile, "cumtime_s", 40)})
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
