"""Attribution accuracy of a facts run: do a question's top training rows state the same fact?

The shipped facts data gives each fact (``fact_id``) several phrasings. The held-out questions of
``configs/smollm2.yaml`` are phrasings of facts whose other phrasings were trained on, so a sound
attribution ranks those rows first. For each score artifact found under a run folder (pairwise influence
``influence/scores.safetensors``: ``(N_query, N_train)``; TracInCP ``tracin/sdi.safetensors``:
``(N_train, N_query)``) this prints and writes ``attribution_accuracy.json``:

- ``top1``: share of questions whose most helpful training row states the same fact;
- ``recall_at_5``: share of each question's same-fact training rows found in its top 5 (averaged);
- ``chance_top1``: the same share for a random ranking (same-fact rows / training rows, averaged).

Usage: ``python -m lit_attrib.tools.real_model_report runs/smollm2 [--facts data/facts/facts.jsonl]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lit_attrib.io import atomic_path, read_jsonl

__all__ = ["attribution_accuracy", "main"]

ARTIFACTS = {"influence": ("influence/scores.safetensors", "scores", False),
             "tracin": ("tracin/sdi.safetensors", "tracin", True)}


def attribution_accuracy(scores: torch.Tensor, query_indices: list[int], train_indices: list[int],
                         facts: list[str]) -> dict[str, float]:
    """Accuracy of ``scores (N_query, N_train)`` (higher = more helpful) against the rows' fact ids."""
    top1, recall, chance = [], [], []
    for row, query in enumerate(query_indices):
        same = torch.tensor([facts[t] == facts[query] for t in train_indices])
        if not same.any():
            continue
        order = torch.argsort(scores[row], descending=True)
        top1.append(float(same[order[0]]))
        recall.append(float(same[order[:5]].sum()) / min(int(same.sum()), 5))
        chance.append(float(same.float().mean()))
    count = len(top1)
    if not count:
        return {"questions": 0}
    return {"questions": count, "top1": sum(top1) / count, "recall_at_5": sum(recall) / count,
            "chance_top1": sum(chance) / count}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder, e.g. runs/smollm2")
    parser.add_argument("--facts", default="data/facts/facts.jsonl", help="the facts file the run trained on")
    args = parser.parse_args(argv)
    facts = [row["fact_id"] for row in read_jsonl(args.facts)]
    results = {}
    for name, (path, key, transposed) in ARTIFACTS.items():
        file = Path(args.run) / path
        if not file.is_file():
            continue
        tensors = load_file(str(file))
        scores = tensors[key].T if transposed else tensors[key]
        results[name] = attribution_accuracy(scores.double(), tensors["query_indices"].tolist(),
                                             tensors["train_indices"].tolist(), facts)
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[name].items())
        print(f"{name}: {shown}")
    with atomic_path(Path(args.run) / "attribution_accuracy.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
