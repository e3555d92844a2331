"""Gradient index build throughput: ``GradientIndexCallback`` in a predict pass against bergson's ``build``.

One invocation builds a per-example gradient index of the same token rows with the same model twice:

- **lit_attrib**: ``Trainer.predict`` with ``GradientIndexCallback(stages=["predict"])`` over the MLP
  projections (``*.mlp.*_proj``, 6 layers), ``projection_dim`` k per side (k_out × k_in = 64 × 64 per layer by
  default), float16 rows, in batches of ``--batch-size`` whole examples (``configs/index_quickstart.yaml``'s
  pass), in the variants ``matched`` (``curvature: false``: what bergson's build computes) and ``quickstart``
  (``curvature: true``, the shipped config: the projected K-FAC curvature is fitted in the same pass);
- **bergson** (PyPI ``bergson``, run in its own virtual environment ``--bergson-python`` as a subprocess,
  CPU, float32 model): ``bergson.cli.commands.Build(index_cfg, preprocess_cfg).execute()`` (what
  ``bergson build`` runs) with ``projection_dim`` k (a k × k double-sided projection per module), the
  attention projections excluded with ``filter_modules`` (its collector hooks ``model.base_model``, so
  ``lm_head`` is never tracked: the same 6 MLP layers remain), no normaliser (no optimizer state), no
  preconditioner, no unit normalisation, no aggregation, summed loss; batches of at most ``--batch-size``
  rows and ``--batch-size`` × 64 padded tokens (its length-sorted bin packing). bergson stores the rows in
  the model's dtype (float32); it has no float16 storage for a float32 model.

The model is the quickstart Llama (``configs/quickstart.yaml``: hidden 96, MLP 256, 2 layers, 4 heads; built
from config with seed 0, untrained: build speed does not depend on the weights), saved with
``save_pretrained`` (and the facts tokenizer) for bergson; its saved ``max_position_embeddings`` is raised
from 128 to ``--batch-size`` × 64 because bergson refuses a ``token_batch_size`` above the model's context
(rotary embeddings do not depend on it: the script checks that both copies give the same logits). The data
are the shipped facts (``data/facts/facts.jsonl``, QA format, max_length 64) repeated ``--copies`` times,
tokenized once by ``TextDataModule``; bergson gets exactly those ``input_ids`` and ``labels`` (prompt
tokens at -100) as a dataset saved with ``save_to_disk``, so both take the same loss, the summed NLL of
each example's answer tokens. The script checks bergson's stored per-example losses against lit_attrib's.

Timings: each side's whole build call (lit_attrib: ``trainer.predict``, with the tokenized data and the
built module ready; bergson: ``Build.execute``, which also reads the saved dataset, tokenizer and model, so
the model load is reported and taken off too) and its gradient pass alone (lit_attrib: the callback's
``on_predict_start`` to its ``on_predict_end`` with the merge and writing of the index; bergson:
``collect_gradients``, its forward/backward loop with the writing of the index). Python and library
imports are outside every timing; the end-to-end bergson subprocess time is recorded too. Throughput counts
the tokens that carry loss (answer tokens, EOS included) and, separately, all non-padding tokens, the same
counts for both sides. Both sides run ``--threads`` torch threads (``OMP_NUM_THREADS`` too). Every timing is
the fastest of ``--repeats`` interleaved runs; the 1-minute load average is recorded. Goal: lit_attrib ÷
bergson ≤ 0.5 in time. Results go to ``benchmarks/results/index_build_throughput.json``.

bergson is installed in a separate virtual environment that sees the system packages, so that pip never
pulls another torch (bergson 2.5.1 needs none of torchvision, torchaudio or bitsandbytes at import)::

    python -m venv --system-site-packages /work/bergson-venv
    /work/bergson-venv/bin/pip install --no-deps bergson==2.5.1 jaxtyping ml_dtypes natsort petname \\
        simple-parsing torchopt optree graphviz wadler_lindig

Run: ``python benchmarks/index_build_throughput.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = ROOT / "data/facts/facts.jsonl", ROOT / "data/facts/tokenizer"
RESULTS = ROOT / "benchmarks" / "results" / "index_build_throughput.json"
QUICKSTART = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
TARGETS = ["*.mlp.*_proj"]
BERGSON_FILTER = "*.self_attn.*"  # bergson tracks every Linear of model.base_model that this glob does not match
MAX_LENGTH = 64
VARIANTS = {"matched": {"curvature": False}, "quickstart": {"curvature": True}}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------ bergson side
def bergson_worker(config_path: str) -> None:
    """Run in bergson's environment: one timed ``Build.execute``; prints one JSON line of timings."""
    config = json.loads(Path(config_path).read_text())
    import torch

    torch.set_num_threads(config["threads"])
    import importlib.metadata

    import bergson.build as build_module
    from bergson.cli.commands import Build
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig

    timings: dict[str, float] = {}
    padded = {"tokens": 0, "batches": 0}

    def timed(name, function, count_batches=False):
        def wrapper(*args, **kwargs):
            if count_batches:
                lengths = kwargs["data"]["length"]
                for batch in kwargs["batches"]:
                    padded["tokens"] += len(batch) * max(lengths[i] for i in batch)
                    padded["batches"] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    build_module.collect_gradients = timed("collect_s", build_module.collect_gradients, count_batches=True)
    build_module.setup_model_and_peft = timed("model_load_s", build_module.setup_model_and_peft)
    build_module.setup_data_pipeline = timed("data_s", build_module.setup_data_pipeline)
    GradientCollector.teardown = timed("finish_s", GradientCollector.teardown)

    index_cfg = IndexConfig(
        run_path=config["run_path"], overwrite=True, model=config["model"], precision="fp32",
        projection_dim=config["k"], projection_seed=0, filter_modules=BERGSON_FILTER,
        token_batch_size=config["token_batch_size"], max_batch_size=config["batch_size"], loss_reduction="sum",
        data=DataConfig(dataset=config["dataset"], split="train"),
    )
    preprocess_cfg = PreprocessConfig(unit_normalize=False, aggregation="none")
    start = time.perf_counter()
    Build(index_cfg, preprocess_cfg).execute()
    timings["build_s"] = time.perf_counter() - start
    print(json.dumps({"timings": timings, "padded_tokens": padded["tokens"], "batches": padded["batches"],
                      "bergson": importlib.metadata.version("bergson"),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


def run_bergson(args, folder: Path, model_dir: Path, dataset_dir: Path, repeat: int) -> dict:
    """One bergson build as a subprocess of ``--bergson-python``: its timings and the whole subprocess time."""
    run_path = folder / f"bergson_{repeat}"
    config = {"run_path": str(run_path), "model": str(model_dir), "dataset": str(dataset_dir), "k": args.k,
              "batch_size": args.batch_size, "token_batch_size": args.batch_size * MAX_LENGTH,
              "threads": args.threads}
    config_path = folder / f"bergson_{repeat}.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    done = subprocess.run([args.bergson_python, str(Path(__file__).resolve()), "--bergson-worker", str(config_path)],
                          check=False, capture_output=True, text=True, env=env, cwd=folder)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bergson build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["subprocess_s"] = seconds
    result["run_path"] = str(run_path)
    return result


# ---------------------------------------------------------------------------------- lit_attrib side
def run_lit_attrib(args, module, data, folder: Path, variant: str) -> dict:
    """One ``trainer.predict`` with ``GradientIndexCallback``: the whole call and the callback's pass."""
    from lightning.pytorch import Callback, Trainer

    from lit_attrib.callbacks import GradientIndexCallback

    marks: dict[str, float] = {}

    class Mark(Callback):  # one before the index callback (start) and one after it (end)
        def __init__(self, name):
            self.name = name

        def on_predict_start(self, trainer, pl_module):
            marks.setdefault(f"start_{self.name}", time.perf_counter())

        def on_predict_end(self, trainer, pl_module):
            marks[f"end_{self.name}"] = time.perf_counter()

    callback = GradientIndexCallback(target_modules=TARGETS, projection_dim=args.k, seed=0, storage_dtype="float16",
                                     stages=["predict"], output_dir=str(folder), overwrite=True, **VARIANTS[variant])
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[Mark("first"), callback, Mark("last")])
    start = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    rows = json.loads((folder / "index.json").read_text())["collection"]["rows_added"]
    return {"build_s": seconds, "collect_s": marks["end_last"] - marks["start_first"],
            "finish_s": marks["end_last"] - marks["end_first"], "rows": rows}


# ------------------------------------------------------------------------------------------- checks
def example_losses(model, dataset, batch_size: int, pad_token_id: int):
    """Summed NLL of each row's labelled tokens (the loss both sides differentiate), in dataset order."""
    import torch
    import torch.nn.functional as F

    from lit_attrib.data.collate import CausalLMCollator

    collate = CausalLMCollator(pad_token_id=pad_token_id)
    rows = dataset.select_columns(["input_ids", "labels", "index"])
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
            losses.append(nll.view_as(labels).sum(1))
    return torch.cat(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--copies", type=int, default=8,
                        help="times the 576 facts rows are repeated (8: 4608 examples)")
    parser.add_argument("--k", type=int, default=64,
                        help="projection_dim per side (k × k per layer; at most 96, the smallest layer side, so that "
                             "both sides keep the same shapes)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch (both sides)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="lit_attrib variants (matched: no curvature, as bergson; quickstart: with curvature)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--bergson-python", default="/work/bergson-venv/bin/python",
                        help="python of the environment with bergson installed")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--bergson-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bergson_worker:
        bergson_worker(args.bergson_worker)
        return

    os.environ.update(OFFLINE)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from _common import lit_attrib_commit, lit_attrib_sources, report_load, write_results
    from datasets import Dataset
    from influence_lds import quiet
    from lightning.pytorch import seed_everything
    from transformers import AutoModelForCausalLM

    from lit_attrib.data import TextDataModule
    from lit_attrib.modules import CausalLMModule

    quiet()
    version = subprocess.run([args.bergson_python, "-c", "import importlib.metadata as m; print(m.version('bergson'))"],
                             check=False, capture_output=True, text=True)
    if version.returncode != 0:
        sys.exit(f"no bergson in {args.bergson_python}: {version.stderr.strip()[-500:]}\n(see this script's docstring)")
    load = {"before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="index_build_throughput_") as tmp:
        tmp = Path(tmp)
        # The data: the facts rows repeated, tokenized once by lit_attrib, the same rows written for bergson.
        lines = [line for line in DATA.read_text().splitlines() if line.strip()]
        source = tmp / "facts_repeated.jsonl"
        source.write_text("\n".join(lines * args.copies) + "\n")
        data = TextDataModule(path=str(source), tokenizer=str(TOKENIZER), format="qa", max_length=MAX_LENGTH,
                              val_size=0, seed=42, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                              predict_split="train", predict_content="examples")
        data.setup("predict")
        rows = data.predict_dataset
        input_ids, labels = rows["input_ids"], rows["labels"]
        dataset_dir = tmp / "bergson_data"
        Dataset.from_dict({"input_ids": input_ids, "labels": labels}).save_to_disk(str(dataset_dir))
        loss_tokens = sum(sum(1 for t in row[1:] if t != -100) for row in labels)
        all_tokens = sum(len(row) for row in input_ids)
        lit_padded = sum(len(batch["input_ids"]) * batch["input_ids"].shape[1] for batch in data.predict_dataloader())

        # The model: the quickstart Llama, seed 0, saved for bergson (context raised for its batch check).
        seed_everything(0, workers=True)
        module = CausalLMModule(config=QUICKSTART, tokenizer=str(TOKENIZER))
        module.configure_model()
        model_dir = tmp / "model"
        module.model.save_pretrained(str(model_dir))
        data.tokenizer.save_pretrained(str(model_dir))
        config_file = model_dir / "config.json"
        saved = json.loads(config_file.read_text())
        saved["max_position_embeddings"] = max(saved["max_position_embeddings"], args.batch_size * MAX_LENGTH)
        config_file.write_text(json.dumps(saved, indent=2))
        module.eval()
        reloaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        ours_loss = example_losses(module.model, rows, args.batch_size, data.tokenizer.pad_token_id)
        same_model = float((example_losses(reloaded, rows, args.batch_size, data.tokenizer.pad_token_id)
                            - ours_loss).abs().max())
        del reloaded
        print(f"{len(input_ids)} examples, {loss_tokens} loss tokens, {all_tokens} tokens; padded tokens lit_attrib "
              f"{lit_padded}; k = {args.k} (64 × 64 per layer when k = 64), batches of {args.batch_size}, "
              f"{args.threads} thread(s); saved model's losses differ by {same_model:.2e}", flush=True)

        runs: dict[str, list[dict]] = {name: [] for name in [*args.variants, "bergson"]}
        for repeat in range(args.repeats):  # interleaved
            for variant in args.variants:
                result = run_lit_attrib(args, module, data, tmp / f"lit_{variant}_{repeat}", variant)
                runs[variant].append(result)
                print(f"  repeat {repeat}: lit_attrib {variant}: build {result['build_s']:.2f} s, "
                      f"pass {result['collect_s']:.2f} s (finish {result['finish_s']:.2f} s)", flush=True)
                shutil.rmtree(tmp / f"lit_{variant}_{repeat}", ignore_errors=True)
            result = run_bergson(args, tmp, model_dir, dataset_dir, repeat)
            runs["bergson"].append(result)
            t = result["timings"]
            print(f"  repeat {repeat}: bergson: build {t['build_s']:.2f} s (model load {t['model_load_s']:.2f} s), "
                  f"pass {t['collect_s']:.2f} s (finish {t['finish_s']:.2f} s), "
                  f"subprocess {result['subprocess_s']:.2f} s", flush=True)
            if repeat == 0:  # bergson saw the same rows: its stored per-example losses are ours
                import numpy as np
                from datasets import load_from_disk

                stored = load_from_disk(str(Path(result["run_path"]) / "data.hf"))
                theirs = torch.from_numpy(np.asarray(stored["loss"], dtype=np.float64))
                loss_check = {"max_abs_diff": float((theirs - ours_loss.double()).abs().max()),
                              "max_loss": float(ours_loss.abs().max()), "rows": len(stored)}
                grads_shape = json.loads((Path(result["run_path"]) / "info.json").read_text()) \
                    if (Path(result["run_path"]) / "info.json").exists() else None
            if repeat < args.repeats - 1:
                shutil.rmtree(result["run_path"], ignore_errors=True)
    load["after"] = os.getloadavg()[0]

    def best(name: str, key: str) -> float:
        if name == "bergson":
            if key == "build_excl_load_s":
                return min(r["timings"]["build_s"] - r["timings"]["model_load_s"] for r in runs[name])
            if key == "subprocess_s":
                return min(r["subprocess_s"] for r in runs[name])
            return min(r["timings"][key] for r in runs[name])
        return min(r[key] for r in runs[name])

    bergson = {key: best("bergson", key) for key in ("build_s", "build_excl_load_s", "collect_s", "finish_s",
                                                      "model_load_s", "subprocess_s")}
    print(f"\nper-example losses, bergson's stored − ours: max |diff| {loss_check['max_abs_diff']:.2e} "
          f"(largest loss {loss_check['max_loss']:.1f}, {loss_check['rows']} rows)")
    print(f"padded tokens: lit_attrib {lit_padded} (dataset order), bergson {runs['bergson'][0]['padded_tokens']} "
          f"(length-sorted bins)\n")
    print("| side | build call s | gradient pass s | of which finish s | loss tok/s (build) | all tok/s (build) | "
          "ours ÷ bergson build | ours ÷ bergson pass |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for name in [*args.variants, "bergson"]:
        build = best(name, "build_excl_load_s" if name == "bergson" else "build_s")
        collect = best(name, "collect_s")
        row = {"side": name if name == "bergson" else f"lit_attrib {name}",
               "arguments": {} if name == "bergson" else VARIANTS[name],
               "build_s": round(build, 3), "collect_s": round(collect, 3), "finish_s": round(best(name, "finish_s"), 3),
               "loss_tokens_per_s": round(loss_tokens / build, 1), "all_tokens_per_s": round(all_tokens / build, 1),
               "loss_tokens_per_s_pass": round(loss_tokens / collect, 1),
               "all_tokens_per_s_pass": round(all_tokens / collect, 1)}
        if name != "bergson":
            row["rows"] = runs[name][0]["rows"]
            row["build_ratio"] = round(build / bergson["build_excl_load_s"], 3)
            row["build_ratio_incl_bergson_model_load"] = round(build / bergson["build_s"], 3)
            row["pass_ratio"] = round(collect / bergson["collect_s"], 3)
        table.append(row)
        ratio = (f"{row['build_ratio']:.3f} | {row['pass_ratio']:.3f}" if name != "bergson" else "1 | 1")
        print(f"| {row['side']} | {build:.2f} | {collect:.2f} | {row['finish_s']:.2f} | "
              f"{row['loss_tokens_per_s']:.0f} | "
              f"{row['all_tokens_per_s']:.0f} | {ratio} |")
    print(f"\nbergson build including its model load {bergson['build_s']:.2f} s, whole subprocess "
          f"{bergson['subprocess_s']:.2f} s (imports included); goal: ours ÷ bergson ≤ 0.5 in time")
    report_load(load, args.threads)
    import lightning
    import transformers

    write_results({
        "commit": lit_attrib_commit(), "sources": lit_attrib_sources(),
        "arguments": {k: str(v) for k, v in vars(args).items() if k != "bergson_worker"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lightning": lightning.__version__, "bergson": version.stdout.strip(),
                     "python": sys.version.split()[0]},
        "data": {"examples": len(input_ids), "loss_tokens": loss_tokens, "all_tokens": all_tokens,
                 "padded_tokens_lit_attrib": lit_padded, "padded_tokens_bergson": runs["bergson"][0]["padded_tokens"],
                 "batches_bergson": runs["bergson"][0]["batches"], "max_length": MAX_LENGTH},
        "matching": {"layers": "6 MLP projections (gate/up/down of 2 layers)", "lit_attrib_targets": TARGETS,
                     "bergson_filter_modules": BERGSON_FILTER, "projection": f"{args.k} x {args.k} per layer",
                     "storage": {"lit_attrib": "float16", "bergson": "float32 (the model's dtype)"},
                     "loss": "summed NLL of the answer tokens (labels), both",
                     "bergson": "fp32, no normaliser, no preconditioner, unit_normalize false, aggregation none, "
                                "loss_reduction sum, rademacher/jl projection",
                     "saved_model_loss_max_abs_diff": same_model, "bergson_loss_check": loss_check,
                     "bergson_info": grads_shape},
        "results": table, "bergson_best": {k: round(v, 3) for k, v in bergson.items()},
        "runs": {name: [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("run_path",)} for r in values] for name, values in runs.items()},
        "load": load,
    }, args.output)


if __name__ == "__main__":
    main()
