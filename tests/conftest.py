"""Shared fixtures. Everything here is offline: the hub clients are told so before they are imported."""

from __future__ import annotations

import os

for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "data" / "facts" / "facts.jsonl"
TOKENIZER = REPO / "data" / "facts" / "tokenizer"

# Tiny configs of every model family lit_attrib is tested on (vocab and special ids come from the tokenizer).
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "diffllama": dict(model_type="diffllama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
    "olmo2": dict(model_type="olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def facts_path() -> str:
    return str(FACTS)


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(TOKENIZER)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, warnings: bool = False) -> subprocess.CompletedProcess:
    """Run ``lit-attrib ARGS`` in a subprocess (as a user would) and return the finished process.

    ``tests/`` is on the subprocess's path, so configs may name test helpers by class_path. Warnings are
    off unless ``warnings`` (then as a user sees them: Python's own filters, no PYTHONWARNINGS).
    """
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    if warnings:
        del env["PYTHONWARNINGS"]
    return subprocess.run(
        [sys.executable, "-m", "lit_attrib", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def override_config(tmp_path: Path, save_last: bool = True, **trainer: object) -> Path:
    """A YAML that sends every output of configs/quickstart.yaml into ``tmp_path`` and shortens the run."""
    import yaml

    config = {
        "trainer": {
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "tb"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": save_last}},
                {"class_path": "lit_attrib.callbacks.GenerationWriter",
                 "init_args": {"output_dir": str(tmp_path / "predict")}},
            ],
            "enable_progress_bar": False,
            **trainer,
        }
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
