"""SDI through the `lit-attrib` command: configs/sdi_looped.yaml, and 1 vs 2 CPU DDP processes give the same results."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from safetensors.torch import load_file

from lit_attrib.modules.looped import LoopedTransformerModule

MODEL = dict(vocab_size=14, d_model=16, n_heads=2, d_ff=32, n_loops=2, max_length=16)


def _overlay(tmp_path, name: str, checkpoints: list[str], **init_args) -> str:
    """``configs/sdi_looped.yaml`` on a tiny looped model in float64, 45 training rows, outputs in tmp_path."""
    data = yaml.safe_load((REPO / "configs" / "sdi_looped.yaml").read_text())
    data["trainer"]["callbacks"] = [c for c in data["trainer"]["callbacks"] if "SketchedGrad" in c["class_path"]]
    data["trainer"]["callbacks"][0]["init_args"].update(checkpoints=checkpoints, output_dir=str(tmp_path / name),
                                                        **init_args)
    data["trainer"].update(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                           precision="64-true")
    data["model"]["init_args"].update(MODEL)
    # 45 rows in batches of 4: 2 processes do not divide them evenly
    data["data"]["init_args"].update(num_train=45, num_val=5, eval_batch_size=4)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_sdi_equals_one_process(tmp_path):
    paths = []
    for seed in range(2):
        module = LoopedTransformerModule(**MODEL, init_seed=seed)
        path = tmp_path / f"epoch={seed}.ckpt"
        torch.save({"state_dict": module.state_dict(), "optimizer_states": [{"param_groups": [{"lr": 0.1 * (seed + 1)}]}]},
                   path)
        paths.append(str(path))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    results = {}
    for processes, extra in ((1, []), (2, ddp)):
        name = f"sdi_{processes}"
        overlay = _overlay(tmp_path, name, [str(tmp_path / "epoch=*.ckpt")], sketch_dim=256, dtype="float64")
        result = run_cli("predict", "-c", overlay, *extra, in_process=processes == 1)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = load_file(str(tmp_path / name / "sdi.safetensors"))
        metadata = json.loads((tmp_path / name / "sdi.json").read_text())
        assert [c["eta"] for c in metadata["checkpoints"]] == pytest.approx([0.1, 0.2])
        assert metadata["steps"] == ["prelude", "loop 1", "loop 2", "readout"]
        assert (tmp_path / name / "trajectories.png").is_file()
    one, two = results["sdi_1"], results["sdi_2"]
    assert one["train_indices"].tolist() == two["train_indices"].tolist() == list(range(45))
    assert one["query_indices"].tolist() == two["query_indices"].tolist() == list(range(45, 50))
    torch.testing.assert_close(two["sdi"], one["sdi"], rtol=1e-9, atol=1e-12)
    assert float(one["sdi"].abs().sum()) > 0
