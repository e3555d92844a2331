"""The quickstart as a user runs it: `lit-attrib validate/fit/predict` in subprocesses, and DDP."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from conftest import REPO, override_config, run_cli
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TRAIN_TAGS = {"train/loss", "train/lr", "train/samples_per_sec", "train/tokens_per_sec", "train/memory_mb"}
VAL_TAGS = {"val/loss", "val/perplexity"}


def _events(run_dir) -> EventAccumulator:
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {run_dir}"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


@pytest.mark.slow
def test_quickstart_fit_lowers_perplexity_and_logs_everything(tmp_path):
    override = override_config(tmp_path, max_epochs=4, check_val_every_n_epoch=1)
    layers = ["-c", QUICKSTART, "-c", str(override)]

    # The starting point: the same config-built model (fixed init_seed) before any training.
    before = run_cli("validate", *layers, in_process=True)
    assert before.returncode == 0, before.stderr[-3000:]
    start = _events(tmp_path / "tb" / "validate").Scalars("val/perplexity")[-1].value

    fit = run_cli("fit", *layers, in_process=True)
    assert fit.returncode == 0, fit.stderr[-3000:]
    events = _events(tmp_path / "tb" / "fit")
    tags = set(events.Tags()["scalars"])
    assert TRAIN_TAGS | VAL_TAGS <= tags, tags
    assert events.PluginTagToContent("hparams"), "hyperparameters were not logged"
    perplexities = [event.value for event in events.Scalars("val/perplexity")]
    assert len(perplexities) == 4 and perplexities[-1] < start / 2, (start, perplexities)
    assert all(value > 0 for value in (e.value for e in events.Scalars("train/tokens_per_sec")))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()

    # Base vs fine-tuned answers side by side, sorted by dataset index.
    predict = run_cli("predict", *layers, "-c", str(REPO / "configs" / "compare_generation.yaml"),
                      "--data.init_args.predict_num_samples", "12", "--ckpt_path", str(checkpoint), in_process=True)
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "predict" / "generated.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    assert all({"prompt", "reference", "generated", "generated_base"} <= set(row) for row in rows)
    table = (tmp_path / "predict" / "comparison.md").read_text()
    assert "| index | prompt | reference | base | fine-tuned |" in table and len(table.splitlines()) == 14
    assert not list((tmp_path / "predict").glob(".*.part")), "part files were left behind"

    # The rest of the main job: factors -> influence -> token scores, on the fine-tuned model.
    def step(config: str, extra: list[str] = (), **init_args) -> subprocess.CompletedProcess:
        result = run_cli("predict", *layers, "-c", overlay(tmp_path, config, **init_args), *extra,
                         "--ckpt_path", str(checkpoint), in_process=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    step("factors_quickstart.yaml", output_dir=str(tmp_path / "factors"), plots=False)
    # Querying with training questions: each ranks its own training example first.
    step("influence_quickstart.yaml", ["--data.init_args.query_split", "train", "--data.init_args.query_num_samples",
                                       "48"], factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "self"))
    scores = load_file(str(tmp_path / "self" / "scores.safetensors"))
    top = scores["train_indices"][scores["scores"].argmax(1)]
    self_rate = float((top == scores["query_indices"]).double().mean())
    assert self_rate >= 0.9, self_rate
    # Querying with held-out paraphrases: how often is the top example a phrasing of the same fact?
    step("influence_quickstart.yaml", factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "paraphrase"))
    scores = load_file(str(tmp_path / "paraphrase" / "scores.safetensors"))
    facts = [json.loads(line)["fact_id"] for line in (REPO / "data" / "facts" / "facts.jsonl").read_text().splitlines()]
    top = scores["train_indices"][scores["scores"].argmax(1)].tolist()
    paraphrase_rate = sum(facts[t] == facts[q] for t, q in zip(top, scores["query_indices"].tolist())) / len(top)
    print(f"top-1 is the query's own training example: {self_rate:.1%} of 48 training questions; "
          f"a paraphrase of the same fact: {paraphrase_rate:.1%} of {len(top)} held-out questions")
    assert paraphrase_rate >= 0.5, paraphrase_rate
    assert "influence/top_5/text_summary" in _events(tmp_path / "tb" / "influence").Tags()["tensors"]
    # TensorBoard runs are named after what they did; a repeated analysis gets a suffix.
    assert {"validate", "fit", "compare", "factors", "influence", "influence_1"} <= {
        p.name for p in (tmp_path / "tb").iterdir()}
    # Token scores of the forget set (the facts data in TOFU's layout), with the HTML page.
    step("token_influence_quickstart.yaml", factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "tokens"))
    tokens = load_file(str(tmp_path / "tokens" / "token_scores.safetensors"))
    assert tokens["scores"].shape[0] == 60 and bool(torch.isfinite(tokens["scores"]).all())
    assert (tmp_path / "tokens" / "token_scores.html").read_text().count('class="q"') == 60


def overlay(tmp_path, config: str, **init_args) -> str:
    """``configs/<config>`` with its (first) callback's arguments updated, written to tmp_path."""
    data = yaml.safe_load((REPO / "configs" / config).read_text())
    data["trainer"]["callbacks"][0]["init_args"].update(init_args)
    path = tmp_path / config
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_fit_on_two_cpu_processes_writes_one_checkpoint(tmp_path):
    override = override_config(tmp_path, save_last=False, max_epochs=2, limit_train_batches=2, limit_val_batches=2,
                               check_val_every_n_epoch=1)
    result = run_cli("fit", "-c", QUICKSTART, "-c", str(override),
                     "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=1-step=4.ckpt"]
    import torch

    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and any(k.startswith("model.") for k in state["state_dict"])
    log = result.stdout + result.stderr
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_predict_writes_every_row_once_in_index_order(tmp_path):
    override = override_config(tmp_path)
    result = run_cli("predict", "-c", QUICKSTART, "-c", str(override), "--data.init_args.predict_num_samples", "7",
                     "--model.init_args.max_new_tokens", "4",
                     "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "predict" / "generated.jsonl").read_text().splitlines()]
    # 7 rows over 2 ranks: the sampler pads one rank with a repeat, which must not appear twice.
    indices = [row["index"] for row in rows]
    assert len(rows) == 7 and indices == sorted(set(indices))
