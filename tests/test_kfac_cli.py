"""Curvature factors through the `lit-attrib` command: 1 vs 2 processes, and inspect-factors."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_attrib.artifacts import load_factors
from lit_attrib.cli import main

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _overlay(tmp_path, name: str) -> str:
    """configs/factors_quickstart.yaml with its output sent to tmp_path/name."""
    config = yaml.safe_load((REPO / "configs" / "factors_quickstart.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(output_dir=str(tmp_path / name), plots=False, dtype="float64")
    config["trainer"].update(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                             precision="64-true")  # float64 model: batch composition must not matter
    config["data"]["init_args"].update(num_samples=32, val_size=0, eval_batch_size=8)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_factors_equal_one_process(tmp_path):
    one = run_cli("predict", "-c", QUICKSTART, "-c", _overlay(tmp_path, "one"), in_process=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("predict", "-c", QUICKSTART, "-c", _overlay(tmp_path, "two"),
                  "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = load_factors(tmp_path / "one"), load_factors(tmp_path / "two")
    assert double.metadata["world_size"] == 2 and single.metadata["world_size"] == 1
    for name in single:
        assert double.metadata["modules"][name]["lambda_examples"] == 32
        assert double.metadata["modules"][name]["activation_tokens"] == single.metadata["modules"][name]["activation_tokens"]
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            torch.testing.assert_close(double[name][key], single[name][key], rtol=1e-6, atol=1e-12)


def test_inspect_factors_plots_saved_factors(tmp_path, capsys):
    from reference_models import RowsDataModule, TinyModule, make_rows
    from test_kfac import LAYERS, collect

    collect(tmp_path, TinyModule(), RowsDataModule(make_rows()), target_modules=LAYERS, dtype="float32")
    main(["inspect-factors", str(tmp_path / "factors"), "--modules", "net.inp,net.head",
          "--tensorboard_dir", str(tmp_path / "tb")])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 8 and all((tmp_path / "factors" / "plots").joinpath(p.split("/")[-1]).exists() for p in printed)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "factors/net.head/lambda_heatmap" in events.Tags()["images"]
    with pytest.raises(SystemExit) as info:
        main(["inspect-factors", str(tmp_path / "missing")])
    assert info.value.code == 2
    assert "no complete factors" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_fit_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Two processes, each holding part of the running sums when the checkpoint is taken."""

    def overlay(name, kill=None):
        callbacks = [
            {"class_path": "lit_attrib.callbacks.KFACCollectorCallback",
             "init_args": {"target_modules": ["*.mlp.down_proj"], "stages": ["fit"], "dtype": "float64",
                           "output_dir": str(tmp_path / name), "plots": False}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / f"{name}-ck"), "every_n_train_steps": 1, "save_top_k": -1}},
        ]
        if kill is not None:
            callbacks.append({"class_path": "reference_models.KillAtStep", "init_args": {"step": kill}})
        config = {"trainer": {"callbacks": callbacks, "max_epochs": 2, "precision": "64-true", "logger": False,
                              "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                              "strategy": "ddp", "devices": 2, "accelerator": "cpu"},
                  "data": {"init_args": {"num_samples": 64, "val_size": 0, "batch_size": 8}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    full = run_cli("fit", "-c", QUICKSTART, "-c", overlay("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_cli("fit", "-c", QUICKSTART, "-c", overlay("resumed", kill=2))
    assert killed.returncode != 0 and "killed at global step 2" in killed.stderr
    assert not (tmp_path / "resumed" / "factors.json").exists()
    resumed = run_cli("fit", "-c", QUICKSTART, "-c", overlay("resumed"),
                      "--ckpt_path", str(tmp_path / "resumed-ck" / "epoch=0-step=2.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, result = load_factors(tmp_path / "full"), load_factors(tmp_path / "resumed")
    for name in reference:
        assert result.metadata["modules"][name]["lambda_examples"] == 64
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            # Same tolerance as the single-process kill-and-resume test.
            difference = (result[name][key] - reference[name][key]).norm() / reference[name][key].norm()
            assert difference < 1e-6, (name, key, float(difference))
