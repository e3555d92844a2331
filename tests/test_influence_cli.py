"""Influence through the `lit-attrib` command: 1 vs 2 CPU DDP processes give the same scores."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from safetensors.torch import load_file

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _overlay(tmp_path, config: str, name: str, **init_args) -> str:
    """``configs/<config>`` on the untrained quickstart model in float64, outputs in tmp_path."""
    data = yaml.safe_load((REPO / "configs" / config).read_text())
    data["trainer"]["callbacks"][0]["init_args"].update(init_args)
    data["trainer"].update(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                           precision="64-true")
    # 45 rows: 2 processes with batches of 4 do not divide them (predict's sampler gives each row to one rank).
    data["data"]["init_args"].update(num_samples=45, val_size=0, eval_batch_size=4)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_scores_equal_one_process(tmp_path):
    factors = str(tmp_path / "factors")
    made = run_cli("predict", "-c", QUICKSTART, "-c", _overlay(tmp_path, "factors_quickstart.yaml", "factors",
                                                                output_dir=factors, plots=False, dtype="float64"),
                   in_process=True)
    assert made.returncode == 0, made.stderr[-3000:]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    results = {}
    for config, tensors in (("influence_quickstart.yaml", "scores"), ("token_influence_quickstart.yaml", "token_scores")):
        for processes, extra in ((1, []), (2, ddp)):
            name = f"{tensors}_{processes}"
            overlay = _overlay(tmp_path, config, name, factors=factors, output_dir=str(tmp_path / name), dtype="float64")
            extra = extra + (["--data.init_args.query_split", "train", "--data.init_args.query_num_samples", "6"]
                             if tensors == "scores" else [])
            result = run_cli("predict", "-c", QUICKSTART, "-c", overlay, *extra, in_process=processes == 1)
            assert result.returncode == 0, result.stderr[-3000:]
            results[name] = load_file(str(tmp_path / name / f"{tensors}.safetensors"))
    one, two = results["scores_1"], results["scores_2"]
    assert one["train_indices"].tolist() == two["train_indices"].tolist() == list(range(45))
    torch.testing.assert_close(two["scores"], one["scores"], rtol=1e-9, atol=0)
    one, two = results["token_scores_1"], results["token_scores_2"]
    assert one["query_indices"].tolist() == two["query_indices"].tolist()
    assert torch.equal(one["mask"], two["mask"])
    torch.testing.assert_close(two["scores"], one["scores"], rtol=1e-9, atol=1e-12)
