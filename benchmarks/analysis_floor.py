"""Floor benchmark: each analysis pass's time ÷ a plain forward + backward over the same rows, and its peak memory.

Issue 16's benchmark. On the real model (``--model smollm2``: SmolLM2-135M-Instruct from
``models/SmolLM2-135M-Instruct``, the chat format of ``configs/smollm2.yaml``) or the tiny quickstart Llama
(``--model tiny``: ``configs/quickstart.yaml``'s model built from config, seed-initialised, QA format), with
every attention and MLP projection tracked (``["*.mlp.*_proj", "*.self_attn.*_proj"]``: 210 layers on
SmolLM2, 14 on the tiny model), it runs each pass the way a user does (``Trainer.predict`` / ``Trainer.fit``
with the callback, arguments as in ``configs/smollm2_*.yaml`` and ``configs/*_quickstart.yaml``):

- ``factors``: ``KFACCollectorCallback(strategy="ekfac")`` over the training rows (covariance pass, then the
  lambda pass; each timed apart);
- ``pairwise``: ``InfluenceCallback`` (full rank), training rows against ``--queries`` queries;
- ``pairwise_r32``: the same with ``query_gradient_rank=32``;
- ``token``: ``TokenInfluenceCallback`` (direction from the TOFU-style forget and retain rows of the first
  ``--token-rows`` facts rows, ``--token-queries`` forget rows scored);
- ``tracin``: ``SketchedGradCallback`` in checkpoint mode (``mode="tracin"``, ``sketch_dim`` 4096 as
  ``configs/smollm2_tracin.yaml``) over ``--checkpoints`` checkpoints, training rows against the queries;
- ``sdi_online``: ``SketchedGradCallback`` in online mode during ``Trainer.fit`` (queries sketched every
  ``--sdi-every`` steps);
- ``kfac_fit``: ``KFACCollectorCallback(strategy="kfac", stages=["fit"])`` during ``Trainer.fit``.

Every pass, and every floor, runs in a fresh subprocess with ``torch.set_num_threads(--threads)``, so its
peak resident memory (``ru_maxrss``) is its own. The floors, in the same kind of process and the same run:
a plain forward + backward (``per_example_loss(batch).sum().backward()``, parameter gradients included) over
each loader a pass reads (training rows, queries, forget, retain, scored rows), in the same batches, each timed
twice (cold, then warm; the faster counts, so the floor is the stricter one); and for
the in-fit passes a plain ``Trainer.fit`` step (per-step time over the steps after the first, batch start to
batch end). With ``--repeats`` > 1 everything runs again in the same order (interleaved); the fastest run of
each counts. Factors for ``pairwise``/``token`` and checkpoints for ``tracin`` are made first, untimed.

Printed per pass: seconds; ``× floor``: ÷ one forward + backward over the pass's scored rows (the training
rows; for ``token`` all rows it reads: forget + retain + scored; for in-fit passes per step ÷ a plain fit
step); ``× all rows``: ÷ one forward + backward over every row the pass must differentiate (training rows +
queries per checkpoint, both EKFAC passes, ...: how far the pass is from its own arithmetic floor); peak
RSS; RSS added by the pass (peak − RSS just before it). ``--profile`` runs chosen passes once more under
cProfile (top functions) with an RSS sampler (memory per phase).

    python benchmarks/analysis_floor.py --model tiny                  # a few minutes
    python benchmarks/analysis_floor.py --model smollm2               # ~20 min on 2 cores
    python benchmarks/analysis_floor.py --model smollm2 --passes factors pairwise --profile factors pairwise
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # this checkout's lit_attrib, whatever is installed
DATA = str(ROOT / "data/facts/facts.jsonl")
TARGETS = ["*.mlp.*_proj", "*.self_attn.*_proj"]
PASSES = ["factors", "pairwise", "token", "pairwise_r32", "tracin", "kfac_fit", "sdi_online"]  # by importance
IN_FIT = {"sdi_online", "kfac_fit"}
MODELS = {
    "tiny": {  # configs/quickstart.yaml
        "module": {"config": {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "max_position_embeddings": 128},
                   "tokenizer": str(ROOT / "data/facts/tokenizer"), "learning_rate": 3e-3},
        "data": {"tokenizer": str(ROOT / "data/facts/tokenizer"), "format": "qa", "input_column": "question",
                 "output_column": "answer"},
        "defaults": {"examples": 256, "queries": 16, "token_rows": 120, "token_queries": 8, "fit_steps": 33},
    },
    "smollm2": {  # configs/smollm2.yaml
        "module": {"pretrained": str(ROOT / "models/SmolLM2-135M-Instruct"), "learning_rate": 1e-4},
        "data": {"tokenizer": str(ROOT / "models/SmolLM2-135M-Instruct"), "format": "chat",
                 "system_prompt": "Answer in one sentence."},
        "defaults": {"examples": 32, "queries": 16, "token_rows": 36, "token_queries": 8, "fit_steps": 9},
    },
}


# ----------------------------------------------------------------------------- measuring inside a worker
def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: kB


class RssSampler:
    """RSS every ``interval`` seconds in a background thread: the memory timeline of a pass."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self.start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.start, _rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float, end: float) -> float:
        values = [mb for t, mb in self.samples if start <= t <= end]
        return max(values) if values else float("nan")


class PhaseClock:
    """Wraps named methods of one callback instance: (method, start, end) in seconds since ``origin``."""

    def __init__(self, callback, names: list[str], origin: float) -> None:
        self.events: list[dict] = []
        for name in names:
            original = getattr(callback, name)

            def timed(*args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    end = time.perf_counter()
                    self.events.append({"method": _name, "start": start - origin, "end": end - origin,
                                        "rss_mb": _rss_mb()})
            setattr(callback, name, timed)


class BatchClock:
    """Times each training step from the first callback's batch start to the last callback's batch end."""

    def __init__(self) -> None:
        from lightning.pytorch import Callback

        clock = self
        self.starts: list[float] = []
        self.ends: list[float] = []

        class Start(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _synchronize(pl_module.device)
                clock.starts.append(time.perf_counter())

        class End(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _synchronize(pl_module.device)
                clock.ends.append(time.perf_counter())

        self.first, self.last = Start(), End()

    def step_times(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends)]


# ----------------------------------------------------------------------------- building blocks
def _module(args):
    from lit_attrib.modules import CausalLMModule

    module = CausalLMModule(**MODELS[args.model]["module"])
    module.configure_model()
    return module


def _text_data(args, examples: int, stage: str = "predict"):
    """Training rows (``predict``, whole examples) and ``--queries`` queries (the validation split)."""
    from lit_attrib.data import TextDataModule

    data = TextDataModule(path=DATA, num_samples=examples + args.queries, val_size=args.queries, seed=42,
                          batch_size=args.batch_size, eval_batch_size=args.batch_size, max_length=args.max_length,
                          predict_split="train", predict_content="examples", query_split="val",
                          **MODELS[args.model]["data"])
    data.setup(stage)
    return data


def _tofu_data(args):
    """``configs/*token_influence*.yaml``'s TOFU layout on the first ``--token-rows`` facts rows."""
    from lit_attrib.data import TofuDataModule

    data = TofuDataModule(path=DATA, subset=None, group_column="person", forget_split="forget10",
                          num_samples=args.token_rows, max_length=args.max_length, batch_size=args.batch_size,
                          eval_batch_size=args.batch_size, predict_split="forget", predict_content="examples",
                          predict_num_samples=args.token_queries, **MODELS[args.model]["data"])
    data.setup("predict")
    return data


DEVICE = {"accelerator": "cpu", "precision": "32-true"}  # a worker's --accelerator and --precision


def _trainer(callbacks, **kwargs):
    from lightning.pytorch import Trainer

    kwargs = {"enable_checkpointing": False, **kwargs}
    return Trainer(devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=callbacks, **DEVICE, **kwargs)


def _rows(loader) -> int:
    return sum(int(batch["input_ids"].shape[0]) for batch in loader)


def _forward_backward(module, loader) -> float:
    """One plain forward + backward per batch, on the pass's device and precision (as Lightning would run it:
    bf16-mixed is autocast around the forward)."""
    import torch

    device = next(module.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=DEVICE["precision"] == "bf16-mixed")
    _synchronize(device)
    start = time.perf_counter()
    for batch in loader:
        batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
        with autocast:
            loss = module.per_example_loss(batch).sum()
        loss.backward()
        module.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_peak_mb() -> float | None:
    """Peak memory the pass allocated on the GPU (None on the CPU, where the peak RSS says it)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE["accelerator"] == "cuda" else None


# ----------------------------------------------------------------------------- the workers
def worker(args) -> dict:
    """One pass (or floor, or preparation) in this process."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    DEVICE.update(accelerator=args.accelerator, precision=args.precision)
    folder = Path(args.folder)
    name = args.worker
    module = _module(args)
    if name in ("floor", "fit_floor", "sdi_online", "kfac_fit", "checkpoints"):
        return _fit_worker(args, module, folder) if name != "floor" else _floor_worker(args, module)
    return _predict_worker(args, module, folder)


def _floor_worker(args, module) -> dict:
    module.eval()
    if args.accelerator == "cuda":
        module.cuda()
    text, tofu = _text_data(args, args.examples), _tofu_data(args)
    loaders = {"train": text.predict_dataloader(), "query": text.query_dataloader(),
               "forget": tofu.forget_dataloader(), "retain": tofu.retain_dataloader(),
               "scored": tofu.predict_dataloader()}
    before = _rss_mb()
    cold, warm, rows = {}, {}, {}
    for key, loader in loaders.items():  # the training rows first: cold, as every pass is
        cold[key] = _forward_backward(module, loader)
        rows[key] = _rows(loader)
    for key, loader in loaders.items():  # once more: on a shared machine a single timing can be several times slow
        warm[key] = _forward_backward(module, loader)
    seconds = {key: min(cold[key], warm[key]) for key in loaders}
    return {"seconds": seconds["train"], "loaders_s": seconds, "cold_s": cold, "warm_s": warm, "rows": rows,
            "peak_mb": _peak_mb(), "before_mb": before, "device_peak_mb": _device_peak_mb()}


def _fit_worker(args, module, folder: Path) -> dict:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_attrib.callbacks import KFACCollectorCallback, SketchedGradCallback

    seed_everything(0, verbose=False)
    if args.worker == "checkpoints":  # untimed: the checkpoints tracin replays (weights only; eta given)
        data = _text_data(args, args.examples, "fit")
        saver = ModelCheckpoint(dirpath=str(folder / "checkpoints"), filename="step{step}", every_n_train_steps=1,
                                save_top_k=-1, save_weights_only=True, auto_insert_metric_name=False)
        trainer = _trainer([saver], max_steps=args.checkpoints, limit_val_batches=0, num_sanity_val_steps=0,
                           enable_checkpointing=True)
        trainer.fit(module, datamodule=data)
        return {"paths": sorted(str(p) for p in (folder / "checkpoints").glob("*.ckpt"))}
    data = _text_data(args, args.fit_steps * args.batch_size, "fit")
    clock = BatchClock()
    callbacks = [clock.first]
    if args.worker == "sdi_online":
        callbacks.append(SketchedGradCallback(target_modules=TARGETS, sketch_dim=args.sketch_dim,
                                              every_n_steps=args.sdi_every, queries="query", plots=False,
                                              output_dir=str(folder / f"sdi_online_{os.getpid()}"), overwrite=True))
    elif args.worker == "kfac_fit":
        callbacks.append(KFACCollectorCallback(target_modules=TARGETS, strategy="kfac", stages=["fit"], plots=False,
                                               output_dir=str(folder / f"kfac_fit_{os.getpid()}"), overwrite=True))
    callbacks.append(clock.last)
    trainer = _trainer(callbacks, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    before = _rss_mb()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    steps = clock.step_times()
    later = steps[1:]
    return {"seconds": seconds, "steps": len(steps), "step_times": steps, "first_step_s": steps[0],
            "step_s": sum(later) / len(later), "peak_mb": _peak_mb(), "before_mb": before,
            "device_peak_mb": _device_peak_mb()}


def _predict_worker(args, module, folder: Path) -> dict:
    from lit_attrib.callbacks import InfluenceCallback, KFACCollectorCallback, SketchedGradCallback, \
        TokenInfluenceCallback

    name = args.worker
    out = folder / f"{name}_{os.getpid()}"
    factors = folder / "factors"
    if name in ("factors", "prep_factors"):
        data = _text_data(args, args.examples)
        callback = KFACCollectorCallback(target_modules=TARGETS, strategy="ekfac", fisher="empirical",
                                         stages=["predict"], dtype="float32", plots=False, overwrite=True,
                                         covariance_dtype=args.covariance_dtype if name == "factors" else None,
                                         eigendecomposition_dtype=args.eigendecomposition_dtype if name == "factors"
                                         else "float64",
                                         output_dir=str(factors if name == "prep_factors" else out))
        methods = ["_finish_pass", "_write"]
    elif name in ("pairwise", "pairwise_r32"):
        data = _text_data(args, args.examples)
        callback = InfluenceCallback(factors=str(factors), queries="query", top_k=5, dtype="float32",
                                     query_gradient_rank=32 if name == "pairwise_r32" else None,
                                     query_storage=args.query_storage if name == "pairwise" else "memory",
                                     query_dtype=args.query_dtype, precondition_dtype=args.precondition_dtype,
                                     scoring_dtype=args.scoring_dtype if name == "pairwise" else None,
                                     output_dir=str(out), overwrite=True)
        methods = ["prepare", "on_predict_end"]
    elif name == "token":
        data = _tofu_data(args)
        callback = TokenInfluenceCallback(factors=str(factors), positive="forget", negative="retain", dtype="float32",
                                          output_dir=str(out), overwrite=True)
        methods = ["prepare", "on_predict_end"]
    elif name == "tracin":
        data = _text_data(args, args.examples)
        paths = sorted(str(p) for p in (folder / "checkpoints").glob("*.ckpt"))
        callback = SketchedGradCallback(target_modules=TARGETS, sketch_dim=args.sketch_dim, mode="tracin",
                                        checkpoints=paths, eta=1e-4, queries="query", top_k=5, plots=False,
                                        keep_sketches=False, output_dir=str(out), overwrite=True)
        methods = []
    else:
        raise ValueError(name)
    profile = cProfile.Profile() if args.profile_run else None
    before = _rss_mb()
    with RssSampler() as sampler:
        clock = PhaseClock(callback, methods, sampler.start)
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        _trainer([callback]).predict(module, datamodule=data, return_predictions=False)
        if profile is not None:
            profile.disable()
        end = time.perf_counter()
    seconds = end - start
    t0, t1 = start - sampler.start, end - sampler.start
    result = {"seconds": seconds, "peak_mb": _peak_mb(), "before_mb": before, "device_peak_mb": _device_peak_mb(),
              "phases": clock.events,
              "pass_start": t0, "pass_end": t1,
              "rss_timeline": [(round(t, 2), round(mb)) for t, mb in sampler.samples[::max(1, len(sampler.samples) // 200)]]}
    result["phase_s"] = _phases(name, clock.events, t0, t1)
    result["phase_peak_mb"] = {key: sampler.peak_between(*span) for key, span in _phase_spans(name, clock.events, t0, t1).items()}
    if name in ("pairwise", "pairwise_r32"):
        result["memory"] = json.loads((out / "scores.json").read_text()).get("memory", {})
    if name in ("factors", "prep_factors"):
        meta = json.loads(((factors if name == "prep_factors" else out) / "factors.json").read_text())
        result["layers"] = len(meta["modules"])
        result["factors_dir"] = str(factors if name == "prep_factors" else out)
    if profile is not None:
        from _common import profile_table

        result["profile"] = {"by_tottime": profile_table(profile, "tottime_s", 25),
                             "by_cumtime": profile_table(profile, "cumtime_s", 40)}
    return result


def _phase_spans(name: str, events: list[dict], t0: float, t1: float) -> dict[str, tuple[float, float]]:
    """Named spans of the pass, from the wrapped methods' times."""
    def first(method):
        return next((e for e in events if e["method"] == method), None)

    if name in ("factors", "prep_factors"):
        finishes = [e for e in events if e["method"] == "_finish_pass"]
        write = first("_write") if len([e for e in events if e["method"] == "_write"]) else None
        if len(finishes) >= 2:
            spans = {"covariance pass": (t0, finishes[0]["start"]),
                     "eigendecomposition": (finishes[0]["start"], finishes[0]["end"]),
                     "lambda pass": (finishes[0]["end"], finishes[1]["start"])}
            last_write = [e for e in events if e["method"] == "_write"][-1] if write else None
            spans["write"] = (finishes[1]["start"], last_write["end"] if last_write else t1)
            spans["rest"] = (spans["write"][1], t1)
            return spans
        return {}
    prepare, end = first("prepare"), first("on_predict_end")
    if prepare and end:
        label = "query gradients" if name.startswith("pairwise") else "direction"
        return {"setup": (t0, prepare["start"]), label: (prepare["start"], prepare["end"]),
                "scoring pass": (prepare["end"], end["start"]), "write": (end["start"], end["end"]),
                "rest": (end["end"], t1)}
    return {}


def _phases(name, events, t0, t1) -> dict[str, float]:
    return {key: end - start for key, (start, end) in _phase_spans(name, events, t0, t1).items()}


# ----------------------------------------------------------------------------- the driver
def _run_worker(name: str, args, folder: str, profile: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--folder", folder]
    for key in ("model", "examples", "queries", "token_rows", "token_queries", "fit_steps", "batch_size",
                "max_length", "threads", "checkpoints", "sketch_dim", "sdi_every"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--query-storage", args.query_storage] + (["--query-dtype", args.query_dtype] if args.query_dtype else [])
    command += ["--precondition-dtype", args.precondition_dtype] if args.precondition_dtype else []
    command += ["--covariance-dtype", args.covariance_dtype] if args.covariance_dtype else []
    command += ["--scoring-dtype", args.scoring_dtype] if args.scoring_dtype else []
    command += ["--eigendecomposition-dtype", args.eigendecomposition_dtype]
    command += ["--accelerator", args.accelerator, "--precision", args.precision]
    if profile:
        command.append("--profile-run")
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        error = done.stderr[-3000:]
        print(f"  {name}: FAILED (exit {done.returncode}, {wall:.0f} s)\n{error}", flush=True)
        return {"error": error, "returncode": done.returncode, "process_s": wall}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def _floor_seconds(name: str, floor: dict, args) -> tuple[float, float, str]:
    """(primary floor, all-rows floor, rows description) of a predict pass, from the floor worker's loaders."""
    s, rows = floor["loaders_s"], floor["rows"]
    train, query = s["train"], s["query"]
    if name == "factors":
        return train, 2 * train, f"{rows['train']} train rows (x2 passes)"
    if name.startswith("pairwise"):
        return train, train + query, f"{rows['train']} train + {rows['query']} queries"
    if name == "token":
        allrows = s["forget"] + s["retain"] + s["scored"]
        return allrows, allrows, f"{rows['forget']} forget + {rows['retain']} retain + {rows['scored']} scored"
    if name == "tracin":
        return train, args.checkpoints * (train + query), \
            f"{args.checkpoints} ckpt x ({rows['train']} train + {rows['query']} queries)"
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=PASSES)
    parser.add_argument("--examples", type=int, help="training rows scored / fitted on (default: per model, "
                        + ", ".join(f"{m} {c['defaults']['examples']}" for m, c in MODELS.items()) + ")")
    parser.add_argument("--queries", type=int, help="queries (pairwise, tracin, online SDI); default 16")
    parser.add_argument("--token-rows", type=int, help="facts rows of the TOFU layout (forget10 = the last person(s), "
                        "retain = the rest); default per model (tiny 120, smollm2 36)")
    parser.add_argument("--token-queries", type=int, help="forget rows scored by token; default 8")
    parser.add_argument("--fit-steps", type=int, help="steps of the in-fit passes (one epoch of fit-steps × batch "
                        "rows); default per model (tiny 33, smollm2 9)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints tracin replays")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="sketch_dim of tracin and online SDI")
    parser.add_argument("--sdi-every", type=int, default=4, help="online SDI: every_n_steps (query refreshes)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of everything; the fastest counts")
    parser.add_argument("--profile", nargs="*", default=[], choices=[p for p in PASSES if p not in IN_FIT],
                        help="passes run once more under cProfile (with an RSS timeline)")
    parser.add_argument("--query-storage", choices=["memory", "disk"], default="memory",
                        help="InfluenceCallback's query_storage for the full-rank pairwise pass")
    parser.add_argument("--query-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="InfluenceCallback's query_dtype for the pairwise passes (default: float32, as computed)")
    parser.add_argument("--precondition-dtype", choices=["bfloat16", "float16"], default=None,
                        help="InfluenceCallback's precondition_dtype for the pairwise passes (default: float32)")
    parser.add_argument("--scoring-dtype", choices=["bfloat16"], default=None,
                        help="InfluenceCallback(scoring_dtype=...) of the full-rank pairwise pass")
    parser.add_argument("--covariance-dtype", choices=["bfloat16"], default=None,
                        help="KFACCollectorCallback's covariance_dtype for the timed factors pass (default: float32)")
    parser.add_argument("--eigendecomposition-dtype", choices=["float64", "float32"], default="float64",
                        help="KFACCollectorCallback's eigendecomposition_dtype for the timed factors pass")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu",
                        help="where every pass and floor runs (cuda: the floors synchronise before they stop the "
                             "clock, and the GPU's peak allocation is reported next to the RSS)")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="Lightning precision of every pass; the floors autocast the same way")
    parser.add_argument("--factors", type=Path, help="reuse these EKFAC factors (a KFACCollectorCallback folder of "
                        "the same model and targets) instead of fitting them first")
    parser.add_argument("--output", type=Path, help="default benchmarks/results/analysis_floor_<model>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--profile-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = MODELS[args.model]["defaults"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        warnings.filterwarnings("ignore")
        import logging

        for logger in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(logger).setLevel(logging.ERROR)
        print(json.dumps(worker(args)))
        return

    import lightning
    import torch
    import transformers

    import lit_attrib
    from _common import lit_attrib_commit, lit_attrib_sources, report_load, write_results

    output = args.output or ROOT / "benchmarks" / "results" / f"analysis_floor_{args.model}.json"
    load = {"before": os.getloadavg()[0]}
    started = time.perf_counter()
    results = {"commit": lit_attrib_commit(), "lit_attrib_sources_sha256": lit_attrib_sources(),
               "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]},
               "lit_attrib_path": str(Path(lit_attrib.__file__).parent), "threads": args.threads, "cpus": os.cpu_count(), "target_modules": TARGETS,
               "arguments": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "folder", "profile_run")},
               "runs": {}, "repeats": []}
    passes = [p for p in PASSES if p in args.passes]
    with tempfile.TemporaryDirectory() as folder:
        needs_factors = bool({"pairwise", "pairwise_r32", "token"} & set(passes + args.profile))
        if args.factors:  # factors of an earlier run (same model, --examples and targets)
            (Path(folder) / "factors").symlink_to(args.factors.resolve())
            results["layers"] = len(json.loads((args.factors / "factors.json").read_text())["modules"])
        elif needs_factors and "factors" not in passes:  # else the first timed factors pass writes them
            print("preparing: EKFAC factors (untimed)", flush=True)
            results["layers"] = _run_worker("prep_factors", args, folder).get("layers")
        checkpoints_made = False
        for repeat in range(args.repeats):
            runs = {}
            results["repeats"].append(runs)
            order = ["floor"] + [p for p in passes if p not in IN_FIT]
            if IN_FIT & set(passes):
                order += ["fit_floor"] + [p for p in passes if p in IN_FIT]
            for name in order:
                if name == "tracin" and not checkpoints_made:
                    print(f"preparing: {args.checkpoints} checkpoints (untimed)", flush=True)
                    _run_worker("checkpoints", args, folder)
                    checkpoints_made = True
                runs[name] = _run_worker(name, args, folder)
                if "error" not in runs[name]:
                    print(f"  [{repeat + 1}/{args.repeats}] {name}: {runs[name]['seconds']:.2f} s, peak "
                          f"{runs[name]['peak_mb']:.0f} MB (load {os.getloadavg()[0]:.2f})", flush=True)
                    if name == "factors":
                        results["layers"] = runs[name].get("layers")
                        if not (Path(folder) / "factors").exists():
                            shutil.copytree(runs[name]["factors_dir"], Path(folder) / "factors")
                _collect(results, load, output, args)  # partial results survive an interrupted run
        if args.profile:
            results["profiles"] = {}
            for name in args.profile:
                print(f"profiling {name} (cProfile)", flush=True)
                results["profiles"][name] = _run_worker(name, args, folder, profile=True)
    _collect(results, load, output, args)
    results["total_s"] = time.perf_counter() - started
    print_report(results, args)
    report_load(load, args.threads)
    write_results(results, output)


def _collect(results: dict, load: dict, output: Path, args) -> None:
    """The fastest run of each pass over the repeats so far, the table, and the JSON (written quietly)."""
    for name in results["repeats"][0]:
        good = [r[name] for r in results["repeats"] if name in r and "error" not in r[name]]
        results["runs"][name] = min(good, key=lambda r: r["seconds"]) if good else results["repeats"][0][name]
    load["after"] = os.getloadavg()[0]
    results["load"] = load
    results["table"] = table(results, args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")


def table(results: dict, args) -> list[dict]:
    runs = results["runs"]
    floor, fit_floor = runs.get("floor", {}), runs.get("fit_floor", {})
    rows = []
    if "seconds" in floor:
        rows.append({"pass": "forward+backward (train rows)", "seconds": floor["seconds"], "x_floor": 1.0,
                     "x_all_rows": None, "peak_mb": floor["peak_mb"], "added_mb": floor["peak_mb"] - floor["before_mb"],
                     "rows": f"{floor['rows']['train']} train rows"})
    for name, run in runs.items():
        if name in ("floor", "fit_floor"):
            continue
        if "error" in run:
            rows.append({"pass": name, "error": run["error"][-300:]})
            continue
        if name in IN_FIT:
            if "step_s" not in fit_floor:
                continue
            rows.append({"pass": name, "seconds": run["seconds"], "step_s": run["step_s"],
                         "x_floor": run["step_s"] / fit_floor["step_s"], "x_all_rows": None,
                         "peak_mb": run["peak_mb"], "added_mb": run["peak_mb"] - run["before_mb"],
                         "rows": f"{run['steps']} steps of {args.batch_size}; per step after the first"})
            continue
        if "loaders_s" not in floor:
            continue
        primary, allrows, described = _floor_seconds(name, floor, args)
        rows.append({"pass": name, "seconds": run["seconds"], "x_floor": run["seconds"] / primary,
                     "x_all_rows": run["seconds"] / allrows, "peak_mb": run["peak_mb"],
                     "added_mb": run["peak_mb"] - run["before_mb"], "rows": described,
                     "phases": run.get("phase_s", {})})
    if "step_s" in fit_floor:
        rows.append({"pass": "plain fit step", "seconds": fit_floor["seconds"], "step_s": fit_floor["step_s"],
                     "x_floor": 1.0, "x_all_rows": None, "peak_mb": fit_floor["peak_mb"],
                     "added_mb": fit_floor["peak_mb"] - fit_floor["before_mb"],
                     "rows": f"{fit_floor['steps']} steps of {args.batch_size}"})
    named = {"forward+backward (train rows)": "floor", "plain fit step": "fit_floor"}
    for row in rows:
        row["gpu_peak_mb"] = runs.get(named.get(row["pass"], row["pass"]), {}).get("device_peak_mb")
    return rows


def print_report(results: dict, args) -> None:
    print(f"\n{args.model}: {results.get('layers')} layers tracked ({' '.join(TARGETS)}), {args.threads} threads, "
          f"{args.accelerator} {args.precision}, "
          f"batch {args.batch_size}, max_length {args.max_length}, {args.examples} train rows, {args.queries} queries; "
          f"commit {results['commit']}")
    print(f"{'pass':<30}{'seconds':>9}{'x floor':>9}{'x all rows':>11}{'peak MB':>9}{'added MB':>10}  rows")
    for row in results["table"]:
        if "error" in row:
            print(f"{row['pass']:<30} FAILED: {row['error'].strip().splitlines()[-1]}")
            continue
        seconds = row.get("step_s", row["seconds"])
        unit = " /step" if "step_s" in row else ""
        allrows = f"{row['x_all_rows']:>11.2f}" if row["x_all_rows"] is not None else f"{'':>11}"
        gpu = f", GPU peak {row['gpu_peak_mb']:.0f} MB" if row.get("gpu_peak_mb") is not None else ""
        print(f"{row['pass']:<30}{seconds:>9.2f}{row['x_floor']:>9.2f}{allrows}{row['peak_mb']:>9.0f}"
              f"{row['added_mb']:>10.0f}  {row['rows']}{unit}{gpu}")
    for row in results["table"]:
        if row.get("phases"):
            print(f"  {row['pass']} phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["phases"].items()))
    for name, profile in results.get("profiles", {}).items():
        if "profile" not in profile:
            continue
        print(f"\nprofile of {name} ({profile['seconds']:.2f} s under cProfile; peak {profile['peak_mb']:.0f} MB; "
              f"peak RSS per phase: " + ", ".join(f"{k} {v:.0f} MB" for k, v in profile["phase_peak_mb"].items()) + ")")
        for row in profile["profile"]["by_tottime"][:15]:
            print(f"  {row['tottime_s']:>8.2f} s own {row['cumtime_s']:>8.2f} s cum {row['calls']:>7}  {row['function']}")


if __name__ == "__main__":
    main()
