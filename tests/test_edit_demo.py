"""The curvature-edit demonstration (configs/edit_demo*.yaml), shortened: train a tiny Llama on grammar text
plus random canaries until it memorizes them, fit factors on the grammar text only, find the memorized
set, and sweep ρ. Memorization must fall while held-out perplexity stays bounded."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_cli

from lit_attrib.data import load_tokenizer
from lit_attrib.data.canaries import write_canary_dataset
from lit_attrib.io import read_jsonl

SHORT_MODEL = {"hidden_size": 64, "intermediate_size": 256}


def _config(tmp_path, name: str, **changes) -> str:
    """``configs/<name>.yaml`` with its outputs under ``tmp_path`` (and ``changes`` merged into the trainer's
    arguments or a section's init_args)."""
    text = (REPO / "configs" / f"{name}.yaml").read_text().replace("runs/edit_demo", str(tmp_path))
    config = yaml.safe_load(text)
    for section, values in changes.items():
        init_args = config[section] if section == "trainer" else config[section]["init_args"]
        for key, value in values.items():
            init_args[key] = {**init_args[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_shortened_demo_edit_removes_memorization_and_keeps_perplexity(tmp_path):
    write_canary_dataset(tmp_path / "data", num_general=1500, num_heldout=200, num_canaries=16, canary_repeats=20)
    train = _config(tmp_path, "edit_demo_train", model={"config": SHORT_MODEL}, trainer={"max_epochs": 8})
    factors = _config(tmp_path, "edit_demo_factors")
    edit = _config(tmp_path, "edit_demo", model={"rhos": [0.9, 0.8]})
    steps = [("fit", "-c", train), ("predict", "-c", train, "-c", factors, "--ckpt_path",
                                    str(tmp_path / "checkpoints" / "last.ckpt")),
             ("predict", "-c", edit), ("validate", "-c", edit)]
    for step in steps:
        result = run_cli(*step, in_process=True)
        assert result.returncode == 0, (step, result.stderr[-3000:])
    baseline, *edited = read_jsonl(tmp_path / "edit" / "results.jsonl")
    assert baseline["model"] == "baseline" and baseline["memorization_examples"] == 16
    assert baseline["strict_accuracy"] >= 0.9  # the canaries are memorized before the edit
    # discovery finds every canary the baseline reproduces (and nothing twice)
    windows = [tuple(row["input_ids"]) for row in read_jsonl(tmp_path / "memorized" / "memorized.jsonl")]
    assert len(set(windows)) == len(windows)
    tokenizer = load_tokenizer(str(tmp_path / "data" / "tokenizer"))
    canaries = {tuple(([tokenizer.bos_token_id] + tokenizer(row["text"], add_special_tokens=False)["input_ids"])[:32])
                for row in read_jsonl(tmp_path / "data" / "canaries.jsonl")}
    assert len(canaries & set(windows)) == round(16 * baseline["strict_accuracy"])
    # memorization falls by at least 70 points at some rho while held-out perplexity rises by at most 25 %
    best = min(edited, key=lambda row: row["strict_accuracy"])
    assert baseline["strict_accuracy"] - best["strict_accuracy"] >= 0.7, edited
    assert best["perplexity"] <= 1.25 * baseline["perplexity"], edited
    assert best["distance"] > baseline["distance"] and best["ndcg@10"] > 0.5
    assert (tmp_path / "edit" / "results.png").is_file()
    runs = sorted(path.name for path in (tmp_path / "tensorboard").iterdir())
    assert "edit" in runs and "memorized" in runs, runs  # TensorBoard runs named after what they did
