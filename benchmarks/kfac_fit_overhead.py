"""In-fit K-FAC collection: overhead against a plain fit, and factor error, per collection setting.

A Llama built from config (no downloads) is fine-tuned on the shipped facts data for ``--steps`` steps,
once without callbacks and once with ``KFACCollectorCallback(strategy="kfac", every_n_batches=n,
token_fraction=p)`` for each ``n:p`` of ``--settings`` (batches: every n-th; tokens: a random fraction p
of each collected batch's real tokens). For each setting the script reports

1. overhead: training-step time with the collector ÷ without it (goal ≤ 1.15 at a setting whose factor
   error is ≤ 5 %). Step time is the mean over the steps after the first (the collector's first batch
   also re-runs ``training_step`` once to check the loss reduction; that one-off is reported apart);
2. factor error: ‖A − A_full‖_F / ‖A_full‖_F and the same for G, the largest over the tracked layers,
   against full-rate collection (the first setting, ``1:1``) of the same run (same seed, so the same
   batches and weights).

Every timing is the fastest of ``--repeats`` interleaved runs (shared CPUs; the load average is recorded).
With ``--profile``, one more fit per ``--profile_settings`` entry times the collector's parts (hooks,
covariance products, batch bookkeeping, the first batch's loss check) per step.

Run: ``python benchmarks/kfac_fit_overhead.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import ClassVar, Self

import torch
from _common import StepTimer, lit_attrib_commit, report_load, write_results
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_attrib.artifacts import load_factors
from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.data import TextDataModule
from lit_attrib.engine.gradient_pass import TrainLossScale
from lit_attrib.engine.tracking import LayerTracker
from lit_attrib.modules import CausalLMModule
from lit_attrib.ops.kfac_accumulator import KFACAccumulator, inclusion_probabilities

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "kfac_fit_overhead.json"


# (every_n_batches, token_fraction, token_sampling, covariance dtype, deferred_rows or 0)
Setting = tuple[int, float, str, str, int]


def parse_setting(text: str) -> Setting:
    """``n``, ``n:p``, ``n:p:sampling`` (``norm``, the default, or ``uniform``), ``n:p:sampling:bf16``
    (``covariance_dtype: bfloat16``; the field may be empty) or ``n:p:sampling:dtype:rows`` (``deferred_rows``)."""
    every, _, rest = text.partition(":")
    fraction, _, rest = rest.partition(":")
    sampling, _, rest = rest.partition(":")
    dtype, _, deferred = rest.partition(":")
    if (sampling or "norm") not in ("norm", "uniform"):
        raise argparse.ArgumentTypeError(f"token sampling must be norm or uniform; got {sampling!r} in {text!r}")
    if dtype not in ("", "bf16"):
        raise argparse.ArgumentTypeError(f"the covariance dtype field must be bf16 or empty; got {dtype!r} in {text!r}")
    if deferred and not deferred.isdigit():
        raise argparse.ArgumentTypeError(f"the deferred rows field must be a whole number; got {deferred!r} in {text!r}")
    return int(every), float(fraction or 1), sampling or "norm", dtype or "fp32", int(deferred or 0)


def label(setting: Setting) -> str:
    return (f"{setting[0]}:{setting[1]:g}" + (f":{setting[2]}" if setting[1] < 1 else "")
            + (f" {setting[3]}" if setting[3] != "fp32" else "") + (f" deferred {setting[4]}" if setting[4] else ""))


def fit(args, setting: Setting | None, folder: str) -> tuple[list[float], dict | None]:
    """Step times of one fit (with the collector at ``setting``, or plain for ``None``) and its factors."""
    seed_everything(0, workers=True)
    config = {"model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
              "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 256}
    module = CausalLMModule(config=config, tokenizer=TOKENIZER, learning_rate=1e-3)
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, batch_size=args.batch_size, val_size=0, seed=0)
    timer = StepTimer()
    callbacks = [timer]
    end = StepEnd(timer)  # last: the collector's own batch-end work (its checks, deferred products) is in the step
    if setting is not None:
        callbacks.append(KFACCollectorCallback(target_modules=["*.mlp.*", "*.self_attn.*_proj"], strategy="kfac",
                                               every_n_batches=setting[0], token_fraction=setting[1],
                                               token_sampling=setting[2], plots=False,
                                               covariance_dtype="bfloat16" if setting[3] == "bf16" else None,
                                               deferred_rows=setting[4] or None,
                                               output_dir=folder, overwrite=True))
    callbacks.append(end)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, max_steps=args.steps, limit_val_batches=0, callbacks=callbacks)
    # deferred_rows: the rows still waiting when the pass ends are multiplied after the last step; that time is
    # charged to the last step, so the mean step time holds every product of the fit (the others run inside
    # the collector's on_train_batch_end, which the step's window holds)
    outside: list[float] = []
    flush = KFACAccumulator.flush

    def timed_flush(self) -> None:
        start = time.perf_counter()
        flush(self)
        if not timer.in_step:
            outside.append(time.perf_counter() - start)

    KFACAccumulator.flush = timed_flush
    try:
        trainer.fit(module, datamodule=data)
    finally:
        KFACAccumulator.flush = flush
    timer.times[-1] += sum(outside)
    return timer.times, (load_factors(folder) if setting is not None else None)


class StepEnd(Callback):
    """Ends the step's window after every other callback's ``on_train_batch_end`` (the collector's included)."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.times[-1] = time.perf_counter() - self.timer._start
        self.timer.in_step = False


class PartTimer:
    """Wall time spent inside the collector's parts, patched onto the classes for one fit (then restored)."""

    PARTS: ClassVar[dict] = {  # part -> [(class, method)]
        "covariance products (A and G adds, incl. gather)": [(KFACAccumulator, "add_activations"),
                                                             (KFACAccumulator, "add_gradients")],
        "batch begin/end (mask, sample draw, finiteness check)": [(KFACAccumulator, "begin_batch"),
                                                                  (KFACAccumulator, "end_batch")],
        "loss-reduction check (first batch)": [(TrainLossScale, "for_batch")],
        "hooks: backward hook incl. products": [(LayerTracker, "_gradient")],
        "attach/detach hooks": [(LayerTracker, "attach"), (LayerTracker, "detach")],
    }

    def __init__(self) -> None:
        self.seconds = {part: 0.0 for part in self.PARTS} | {"hooks: forward hook": 0.0}
        self._saved: list = []

    def _timed(self, part: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return timed

    def __enter__(self) -> Self:
        for part, methods in self.PARTS.items():
            for cls, name in methods:
                self._saved.append((cls, name, getattr(cls, name)))
                setattr(cls, name, self._timed(part, getattr(cls, name)))
        make_hook = LayerTracker._hook

        def _hook(tracker, layer):  # the forward hook is a closure: time the closure it returns
            return self._timed("hooks: forward hook", make_hook(tracker, layer))
        self._saved.append((LayerTracker, "_hook", make_hook))
        LayerTracker._hook = _hook
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)


class TokenSpread:
    """Per batch and layer, the full-rate sums ``S_b = Σ_j x_j`` (``x_j = a_j a_jᵀ`` or ``g_j g_jᵀ``) and
    ``Σ_j ‖x_j‖²_F = Σ_j ‖a_j‖⁴``: enough to predict the error of a token sample of any fraction (bias
    columns left out: the benchmark's Llama has none)."""

    def __init__(self) -> None:
        self.batches: dict[tuple[str, str], list[tuple[torch.Tensor, float, int]]] = {}
        self._saved: list = []

    def _record(self, key: str, original):
        def add(accumulator, layer, values):
            rows = values.reshape(-1, values.shape[-1]).double()  # (N, d)
            if accumulator._padding is not None and accumulator._padding.numel() == rows.shape[0]:
                rows = rows[accumulator._padding]  # real tokens only
            if key == "gradient":
                rows = rows * accumulator._scale
            entry = (rows.T @ rows, float((rows.square().sum(1) ** 2).sum()), rows.shape[0], rows.square().sum(1))
            self.batches.setdefault((layer.name, key), []).append(entry)
            return original(accumulator, layer, values)
        return add

    def __enter__(self) -> Self:
        for key, name in (("activation", "add_activations"), ("gradient", "add_gradients")):
            original = getattr(KFACAccumulator, name)
            self._saved.append((name, original))
            setattr(KFACAccumulator, name, self._record(key, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved:
            setattr(KFACAccumulator, name, original)

    def predicted_error(self, fraction: float, sampling: str) -> dict[str, float]:
        """Expected ‖Ŝ − S‖_F / ‖S‖_F of the Horvitz–Thompson sum over each batch's token sample.

        ``uniform``: ``round(p·n)`` of ``n`` tokens without replacement, Var_b = n² (1 − k/n) / k · s²_b, s²_b
        the tokens' variance. ``norm``: each token kept independently with π_t (the collector's), Var_b =
        Σ_t (1/π_t − 1)‖x_t‖⁴."""
        worst = {"activation": 0.0, "gradient": 0.0}
        for (_, key), batches in self.batches.items():
            variance, total = 0.0, 0
            for product, fourth, n, norms in batches:
                if sampling == "norm":
                    values = norms.double().cpu().numpy()  # inclusion_probabilities works in NumPy
                    weights = 0.9 * values / values.sum() + 0.1 / n
                    chances = inclusion_probabilities(weights, fraction * n)
                    variance += float(((1 / chances - 1) * values ** 2).sum())
                else:
                    k = max(1, round(fraction * n))
                    spread = (fourth - float(product.square().sum()) / n) / max(n - 1, 1)
                    variance += n * n * (1 - k / n) / k * spread
                total = total + product
            worst[key] = max(worst[key], (variance / float(total.square().sum())) ** 0.5)
        return worst


def error_model(args, fractions: list[float], folder: str) -> list[dict]:
    """Predicted worst-layer A and G error per token fraction, from one full-rate fit's per-token spread."""
    with TokenSpread() as spread:
        fit(args, (1, 1.0, "norm", "fp32"), folder)
    return [{"token_fraction": p, "token_sampling": sampling,
             **{f"predicted_{key}_error": round(value, 4) for key, value in spread.predicted_error(p, sampling).items()}}
            for sampling in ("norm", "uniform") for p in fractions]


def profile(args, setting: Setting, plain: float, folder: str) -> dict:
    """Milliseconds per collected training step in each part of the collector (steps after the first,
    except the loss check, which happens on the first only), next to the measured overhead."""
    with PartTimer() as parts:
        times, _ = fit(args, setting, folder)
    steps = len(times)
    per_step = {part: seconds / steps * 1e3 for part, seconds in parts.seconds.items()}
    per_step["hooks: backward hook incl. products"] -= per_step["covariance products (A and G adds, incl. gather)"]
    per_step = {part.replace(" incl. products", " (without products)"): value for part, value in per_step.items()}
    overhead = (statistics.mean(times[1:]) - plain) * 1e3
    return {"setting": label(setting), "overhead_ms_per_step": round(overhead, 3), "plain_ms_per_step": round(plain * 1e3, 3),
            "ms_per_step": {part: round(value, 3) for part, value in per_step.items()}}


def relative_error(factors, reference, key: str) -> float:
    return max(float(torch.linalg.norm(factors[name][key].double() - reference[name][key].double())
                     / torch.linalg.norm(reference[name][key].double())) for name in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=48, help="training steps of each fit")
    parser.add_argument("--settings", type=parse_setting, nargs="+",
                        default=[parse_setting(s) for s in ("1:1", "1:0.5", "1:0.25", "1:0.1", "1:0.5:uniform", "2:1",
                                                            "2:0.5", "4:1")],
                        help="every_n_batches:token_fraction[:token_sampling] (norm or uniform, default norm); the "
                             "first is the full-rate reference (1:1)")
    parser.add_argument("--profile", action="store_true", help="also time the collector's parts")
    parser.add_argument("--profile_settings", type=parse_setting, nargs="+",
                        default=[parse_setting(s) for s in ("1:1", "1:0.1")])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load = {"before": os.getloadavg()[0]}
    if args.settings[0][:2] != (1, 1.0) or args.settings[0][3] != "fp32" or args.settings[0][4]:
        parser.error(f"the first setting is the full-rate reference and must be 1:1 (float32); got {label(args.settings[0])}")
    runs: dict = {"plain": []} | {setting: [] for setting in args.settings}
    factors = {}

    def step_median(times_list):  # mean step of the fastest repeat; the first step (warm-up, check's re-run) apart
        return min(statistics.mean(times[1:]) for times in times_list)

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved: a slow spell hits every variant alike
            runs["plain"].append(fit(args, None, "")[0])
            for i, setting in enumerate(args.settings):
                times, factors[setting] = fit(args, setting, str(Path(tmp) / f"setting{i}"))
                runs[setting].append(times)
        plain = step_median(runs["plain"])
        profiles = [profile(args, setting, plain, str(Path(tmp) / "profile")) for setting in args.profile_settings] \
            if args.profile else []
        predictions = error_model(args, [0.9, 0.75, 0.5, 0.25, 0.1], str(Path(tmp) / "model")) if args.profile else []
    load["after"] = os.getloadavg()[0]

    first_plain = min(times[0] for times in runs["plain"])
    rows = []
    print(f"llama width {args.width}, {args.layers} layers, batch {args.batch_size}, {args.steps} steps; "
          f"plain step {plain * 1e3:.1f} ms\n")
    print("| every_n_batches | token_fraction | token_sampling | step time ÷ plain | spread over repeats "
          "| first step ÷ plain first step | A error | G error |")
    print("|---|---|---|---|---|---|---|---|")
    reference = factors[args.settings[0]]
    for setting in args.settings:
        ratios = sorted(statistics.mean(times[1:]) / plain for times in runs[setting])
        first = min(times[0] for times in runs[setting]) / first_plain
        a_error = relative_error(factors[setting], reference, "activation_covariance")
        g_error = relative_error(factors[setting], reference, "gradient_covariance")
        rows.append({"every_n_batches": setting[0], "token_fraction": setting[1], "token_sampling": setting[2],
                     "covariance_dtype": setting[3], "deferred_rows": setting[4] or None,
                     "step_ratio": round(ratios[0], 3),
                     "step_ratios_all_repeats": [round(r, 3) for r in ratios], "first_step_ratio": round(first, 2),
                     "activation_error": round(a_error, 4), "gradient_error": round(g_error, 4)})
        sampling = ", ".join(([setting[2]] if setting[1] < 1 else []) + ([setting[3]] if setting[3] != "fp32" else [])
                             + ([f"deferred {setting[4]}"] if setting[4] else []))
        print(f"| {setting[0]} | {setting[1]:g} | {sampling} | {ratios[0]:.2f} | {ratios[0]:.2f}–{ratios[-1]:.2f} | {first:.2f} "
              f"| {a_error:.1%} | {g_error:.1%} |")
    for result in profiles:
        print(f"\nprofile of {result['setting']}: overhead {result['overhead_ms_per_step']:.2f} ms per step "
              f"(plain step {result['plain_ms_per_step']:.2f} ms); time inside the collector's parts, ms per step:")
        for part, value in result["ms_per_step"].items():
            print(f"  {part}: {value:.3f}")
    if predictions:
        print("\npredicted error of the token sample alone (every batch, from the full-rate fit's per-token spread):")
        print("| token_fraction | token_sampling | predicted A error | predicted G error |\n|---|---|---|---|")
        for row in predictions:
            print(f"| {row['token_fraction']:g} | {row['token_sampling']} | {row['predicted_activation_error']:.1%} "
                  f"| {row['predicted_gradient_error']:.1%} |")
    report_load(load, args.threads)
    write_results({"error_model": predictions, "commit": lit_attrib_commit(), "arguments": {k: str(v) for k, v in vars(args).items()},
                   "plain_step_s": plain, "settings": rows, "profiles": profiles, "load": load}, args.output)


if __name__ == "__main__":
    main()
