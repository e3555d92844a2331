"""Peak memory and time of pairwise influence with and without ``memory_budget`` / ``query_dtype``.

A Llama built from config (d_model 128, MLP 512, 4 layers: the size of the other benchmarks, about the
quickstart's) scores ``--examples`` training rows of the shipped facts data against ``--queries``
validation rows with ``InfluenceCallback`` (full rank, float32) in ``Trainer.predict``. Each setting runs
in a fresh subprocess, so that its peak resident memory (``ru_maxrss``) is its own; the first subprocess
fits the EKFAC factors the others share. The floor is a plain forward + backward over the same training
rows in the same kind of process. Printed per setting: seconds of ``Trainer.predict``, peak RSS, peak RSS
above the process's RSS just before the pass (what the pass adds), the callback's own estimate, the
number of layer groups, and the largest relative difference of the scores to the unbudgeted run.

    python benchmarks/influence_memory.py            # --queries, --examples, --width, --threads, ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import lit_attrib_commit, report_load, write_results

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "influence_memory.json"
TARGETS = ["*.mlp.*", "*.self_attn.*_proj"]
SETTINGS = {  # name: InfluenceCallback arguments; "need/k" budgets are the unbudgeted estimate divided by k
    "no budget": {},
    "budget need/2": {"memory_budget": "need/2"},
    "budget need/4": {"memory_budget": "need/4"},
    "query_dtype bfloat16": {"query_dtype": "bfloat16"},
    "bfloat16 + need/4": {"query_dtype": "bfloat16", "memory_budget": "need/4"},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: kB


def _setup(args: argparse.Namespace):
    import torch

    from lit_attrib.data import TextDataModule
    from lit_attrib.modules import CausalLMModule

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
              "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 256}
    module = CausalLMModule(config=config, tokenizer=TOKENIZER)
    module.configure_model()
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, num_samples=args.examples + args.queries,
                          val_size=args.queries, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                          max_length=args.max_length, predict_split="train", predict_content="examples",
                          query_split="val")
    data.setup("predict")
    return module, data


def _trainer(callbacks):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, callbacks=callbacks)


def worker(args: argparse.Namespace) -> dict:
    """One setting in this process: ``factors``, ``floor``, ``estimate`` or an InfluenceCallback setting."""
    from lit_attrib.callbacks import InfluenceCallback, KFACCollectorCallback

    module, data = _setup(args)
    folder = Path(args.folder)
    if args.worker == "factors":
        callback = KFACCollectorCallback(target_modules=TARGETS, strategy="ekfac", dtype="float32",
                                         output_dir=str(folder / "factors"), plots=False, overwrite=True)
        _trainer([callback]).predict(module, datamodule=data, return_predictions=False)
        return {}
    loader = data.predict_dataloader()
    before = _rss_mb()
    start = time.perf_counter()
    if args.worker == "floor":
        for batch in loader:
            losses = module.per_example_loss(batch)
            losses.sum().backward()
            module.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_mb": _peak_mb(), "before_mb": before}
    arguments = {"memory_budget": 2**50} if args.worker == "estimate" else dict(SETTINGS[args.worker])
    if str(arguments.get("memory_budget", "")).startswith("need/"):
        arguments["memory_budget"] = int(args.need / int(arguments["memory_budget"].split("/")[1]))
    output = folder / args.worker.replace(" ", "_").replace("/", "-")
    callback = InfluenceCallback(factors=str(folder / "factors"), queries="query", output_dir=str(output),
                                 overwrite=True, dtype="float32", **arguments)
    start = time.perf_counter()
    _trainer([callback]).predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    metadata = json.loads((output / "scores.json").read_text())
    return {"seconds": seconds, "peak_mb": _peak_mb(), "before_mb": before, "memory": metadata["memory"],
            "scores": str(output / "scores.safetensors"), "arguments": arguments}


def _run_worker(name: str, args: argparse.Namespace, folder: str, need: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--folder", folder, "--need", str(need)]
    for key in ("width", "layers", "examples", "queries", "batch_size", "max_length", "threads"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"worker {name!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=128, help="d_model (MLP 4×)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=128, help="training rows scored (and fitted on)")
    parser.add_argument("--queries", type=int, default=64, help="queries (the validation split)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--need", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        warnings.filterwarnings("ignore")
        print(json.dumps(worker(args)))
        return

    import torch
    from safetensors.torch import load_file

    load = {"before": os.getloadavg()[0]}
    results = {"commit": lit_attrib_commit(), "torch": torch.__version__, "arguments": {
        k: str(v) for k, v in vars(args).items() if k not in ("worker", "folder", "need", "output")}, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        _run_worker("factors", args, folder)
        results["runs"]["floor"] = _run_worker("floor", args, folder)
        # The callback's own estimate of the unbudgeted pass, from a run with an ample budget (one group).
        need = int(_run_worker("estimate", args, folder)["memory"]["need"])
        results["need"] = need
        reference = None
        for name in ["no budget"] + [s for s in args.settings if s != "no budget"]:
            run = _run_worker(name, args, folder, need=need)
            scores = load_file(run.pop("scores"))["scores"].double()
            reference = scores if reference is None else reference
            run["max_rel_diff"] = float((scores - reference).abs().max() / reference.abs().max())
            results["runs"][name] = run
    load["after"] = os.getloadavg()[0]
    results["load"] = load
    print_table(results)
    report_load(load, args.threads)
    write_results(results, args.output)


def print_table(results: dict) -> None:
    floor = results["runs"]["floor"]
    print(f"\n{'setting':<22}{'seconds':>9}{'× floor':>9}{'peak MB':>9}{'added MB':>10}{'estimate MB':>13}"
          f"{'groups':>8}{'max rel diff':>14}")
    print(f"{'forward+backward':<22}{floor['seconds']:>9.2f}{1.0:>9.2f}{floor['peak_mb']:>9.0f}"
          f"{floor['peak_mb'] - floor['before_mb']:>10.0f}")
    for name, run in results["runs"].items():
        if name == "floor":
            continue
        memory = run["memory"]
        estimate = memory.get("largest", results["need"]) / 2**20
        print(f"{name:<22}{run['seconds']:>9.2f}{run['seconds'] / floor['seconds']:>9.2f}{run['peak_mb']:>9.0f}"
              f"{run['peak_mb'] - run['before_mb']:>10.0f}{estimate:>13.1f}{len(memory['partitions']):>8}"
              f"{run['max_rel_diff']:>14.2e}")


if __name__ == "__main__":
    main()
