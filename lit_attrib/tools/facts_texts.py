"""Texts for the curvature edit on a facts fine-tune: what the model was trained on, as plain text.

``MemorizedSetCallback`` scans texts for windows a model reproduces. For a chat fine-tune those texts
are the training rows as the model saw them, chat template and reply included. This writes them, from
the same configuration as the fine-tune, to ``<out>/scan.jsonl`` (one ``{"text": ...}`` per training
row, in dataset order).

Usage: ``python -m lit_attrib.tools.facts_texts --config configs/smollm2.yaml --out runs/smollm2/edit_data``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from lit_attrib.data import TextDataModule
from lit_attrib.io import atomic_path

__all__ = ["main", "training_texts"]


def training_texts(data: TextDataModule) -> list[dict]:
    """The training rows of ``data`` decoded with their special tokens (the text the model trained on)."""
    data.setup("fit")
    tokenizer = data.tokenizer
    rows = sorted(data.train_dataset, key=lambda row: row["index"])
    return [{"text": tokenizer.decode(row["input_ids"], skip_special_tokens=False), "index": row["index"]}
            for row in rows]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the fine-tune's config (its data: TextDataModule)")
    parser.add_argument("--out", required=True, help="folder to write scan.jsonl into")
    args = parser.parse_args(argv)
    settings = yaml.safe_load(Path(args.config).read_text())["data"]
    data = TextDataModule(**settings.get("init_args", {}))
    rows = training_texts(data)
    path = Path(args.out) / "scan.jsonl"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} training texts to {path}")
    return path


if __name__ == "__main__":
    main()
