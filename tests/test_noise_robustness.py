"""The seed-004 sweep end to end on the quick config (shortened): tables, figures, attention, resume."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_quick_config_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sweep"
    args = ["noise-robustness", "-c", "configs/noise_robustness_quick.yaml", "--output_dir", str(out),
            "--max_samples", "6", "--sft_samples", "96", "--sft_epochs", "1", "--max_new_tokens", "12"]
    done = run_cli(*args, in_process=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["model"], r["dataset"], r["setting"]) for r in rows} == {
        (m, d, s) for m in ("llama", "diffllama") for d in ("clean", "inf", "rcs", "sd") for s in ("zero-shot", "sft")}
    for row in rows:
        folder = out / "eval" / row["model"] / row["setting"] / row["dataset"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert int(row["count"]) == metrics["count"] == 6
        assert float(row["pass@1"]) == pytest.approx(metrics["correct"] / 6)
    table = (out / "results.md").read_text()
    assert table.count("| llama |") == 2 and table.count("| diffllama |") == 2
    assert (out / "results.png").stat().st_size > 10_000
    for dataset in ("clean", "inf", "rcs", "sd"):
        assert (out / f"attention_{dataset}.png").stat().st_size > 10_000
        for model in ("llama", "diffllama"):
            meta = json.loads((out / "attention" / model / dataset / "allocation.json").read_text())
            assert meta["differential"] == (model == "diffllama") and meta["classes"] == ["other", "math", "noise"]
            pooled = meta["ratios"]["signed_mean_over_heads"]
            for layer in pooled.values():
                assert sum(layer.values()) == pytest.approx(1.0)
                assert (layer["noise"] > 0) == (dataset != "clean")  # the noise span is attended only where it exists
    summary = (out / "attention.md").read_text()
    assert summary.count("| diffllama |") == 4
    # a second run reuses every finished step (resume): nothing is evaluated or trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} | {
        p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")}
    again = run_cli(*args, in_process=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
