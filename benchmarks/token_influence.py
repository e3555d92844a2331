"""Token-wise influence: TokenInfluenceCallback's one JVP pass per batch against seed 000's loop.

Seed 000 scores token j of query i with one ``torch.autograd.grad`` per token,
``S_ij = vᵀ ∇θ L(x_ij)``. lit_attrib gets all T scores of a batch from one forward-mode pass
(``S_i· = ∂/∂ε L_i·(θ + ε v)``). This script builds a Llama from config (no downloads), fits EKFAC
factors and the direction ``v = H⁻¹ (mean ∇L(forget) − mean ∇L(retain))`` with the callback, then
times, on the same queries of ``--length`` tokens (every token carries loss):

- ours: ``TokenInfluenceCallback.token_scores`` on each batch of queries (the JVP pass);
- naive: per query, one backward pass per token through the same layers, dotted with the same ``v``;

and reports naive ÷ ours (goal ≥ 20 at T = 128) and the largest relative difference of the scores.
Each timing is the fastest of ``--repeats`` interleaved runs (the CPUs may be shared).

Run: ``python benchmarks/token_influence.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from lit_attrib.callbacks import KFACCollectorCallback, TokenInfluenceCallback
from lit_attrib.data import CausalLMCollator
from lit_attrib.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "token_influence.json"
TARGETS = ["*.mlp.*_proj", "*.self_attn.*_proj"]


class Rows(LightningDataModule):
    def __init__(self, rows, forget, retain, batch_size):
        super().__init__()
        self.rows, self.forget, self.retain, self.batch_size = rows, forget, retain, batch_size

    def _loader(self, rows):
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=CausalLMCollator(pad_token_id=0))

    def predict_dataloader(self):
        return self._loader(self.rows)

    def forget_dataloader(self):
        return self._loader(self.forget)

    def retain_dataloader(self):
        return self._loader(self.retain)


def make_rows(count, length, vocab, seed, start=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, vocab, (length,), generator=generator).tolist()),
             "labels": ids, "index": start + i} for i in range(count)]


def trainer(root):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root)


def naive_scores(module, layers, tangents, batch):
    """Seed 000: one autograd.grad per token, dotted with v."""
    params = [module.get_submodule(name).weight for name in layers]
    vectors = [tangents[f"pl_module.{name}.weight"] for name in layers]
    out = torch.zeros(batch["input_ids"].shape)
    with torch.enable_grad():
        for i in range(batch["input_ids"].shape[0]):
            row = {key: value[i: i + 1] for key, value in batch.items() if torch.is_tensor(value)}
            nll = module.per_token_loss(row)[0]
            for t in range(1, nll.shape[0]):
                grads = torch.autograd.grad(nll[t], params, retain_graph=True)
                out[i, t] = sum((g * v).sum() for g, v in zip(grads, vectors))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=128, help="tokens per query (T)")
    parser.add_argument("--queries", type=int, default=8, help="number of queries")
    parser.add_argument("--batch-size", type=int, default=4, help="queries per JVP pass")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the Llama")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs (fastest kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    vocab = 256
    config = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=max(256, args.length), vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    module = CausalLMModule(config=config, tokenizer=str(ROOT / "data/facts/tokenizer"), init_seed=0)
    module.configure_model()
    module.eval()
    queries = make_rows(args.queries, args.length, vocab, seed=1)
    data = Rows(queries, make_rows(8, args.length, vocab, 2, 1000), make_rows(16, args.length, vocab, 3, 2000),
                args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        factors = KFACCollectorCallback(target_modules=TARGETS, output_dir=f"{tmp}/factors", plots=False,
                                        stages=["predict"])
        fit = trainer(tmp)
        fit_data = Rows(queries + data.retain, [], [], args.batch_size)
        fit.callbacks.append(factors)
        fit.predict(module, fit_data, return_predictions=False)
        callback = TokenInfluenceCallback(factors=f"{tmp}/factors", output_dir=f"{tmp}/tokens")
        run = trainer(tmp)
        run.callbacks.append(callback)
        run.predict(module, data, return_predictions=False)
        layers = list(callback.layers)
        batches = list(data.predict_dataloader())

        def ours():
            return torch.cat([callback.token_scores(run, module, batch) for batch in batches])

        def naive():
            return torch.cat([naive_scores(module, layers, callback.tangents, batch) for batch in batches])

        times = {"ours": [], "naive": []}
        results = {}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("naive", naive)):
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
    mask = torch.ones_like(results["naive"], dtype=torch.bool)
    mask[:, 0] = False
    difference = float((results["ours"][mask] - results["naive"][mask]).norm() / results["naive"][mask].norm())
    best = {name: min(values) for name, values in times.items()}
    summary = {
        "length": args.length, "queries": args.queries, "batch_size": args.batch_size, "hidden": args.hidden,
        "layers": args.layers, "tracked_layers": len(layers), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "seconds": times, "best_seconds": best,
        "speedup_naive_over_ours": best["naive"] / best["ours"], "relative_difference": difference,
        "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(f"T={args.length}, {args.queries} queries, {len(layers)} layers: ours {best['ours']:.3f} s, "
          f"naive {best['naive']:.3f} s -> {summary['speedup_naive_over_ours']:.1f}x faster (goal >= 20x); "
          f"relative difference {difference:.2e}; load average {summary['load_average'][0]:.2f}")


if __name__ == "__main__":
    main()
