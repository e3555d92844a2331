"""What a new user sees: the quickstart's fit and an analysis pass print lit_attrib's lines, progress bars
and nothing else that looks like a warning, except the entries of an explicit allow-list."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, override_config, run_cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

# Lines that may look like warnings, each with why it is allowed (none today).
ALLOWED: tuple[tuple[str, str], ...] = ()

SUSPICIOUS = re.compile(r"warn|deprecat|💡|tip:|be aware", re.IGNORECASE)


def _noise(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if SUSPICIOUS.search(line)]
    return [line for line in lines if not any(re.search(pattern, line) for pattern, _ in ALLOWED)]


@pytest.mark.slow
def test_the_quickstart_prints_no_noise(tmp_path):
    override = override_config(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1)
    fit = run_cli("fit", "-c", QUICKSTART, "-c", str(override), warnings=True)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert _noise(fit.stdout + fit.stderr) == []
    factors = yaml.safe_load((REPO / "configs" / "factors_quickstart.yaml").read_text())
    factors["trainer"]["callbacks"][0]["init_args"].update(output_dir=str(tmp_path / "factors"), plots=False,
                                                           max_examples=16)
    factors["trainer"].update(default_root_dir=str(tmp_path), logger=False)
    (tmp_path / "factors.yaml").write_text(yaml.safe_dump(factors))
    predict = run_cli("predict", "-c", QUICKSTART, "-c", str(tmp_path / "factors.yaml"),
                      "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"), warnings=True)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (tmp_path / "factors" / "factors.safetensors").is_file()
    assert _noise(predict.stdout + predict.stderr) == []
