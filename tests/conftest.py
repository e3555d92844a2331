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


# GPU check (scripts/gpu_check.sh, on a machine with CUDA). Unset (CI, any CPU machine): nothing changes.
# - LIT_ATTRIB_TEST_DEVICE=cuda runs every Trainer a test builds in this process on one GPU (the tests that ask for
#   bf16-mixed get it there). The references stay on the CPU: Lightning moves the module back when a run ends.
# - LIT_ATTRIB_TEST_DEVICE=fsdp runs them under Lightning's FSDP strategy on that GPU. Lightning's FSDP computes in
#   float32 under "32-true" (it converts the module), so the float64 references hold there to float32's precision
#   only: assert_close's tolerances are raised to 1e-5 of the largest entry. The run gets a copy of the module (FSDP
#   leaves the one it wrapped on the GPU), so the tests' references see the module as it was.
_DEVICE_CHECK = os.environ.get("LIT_ATTRIB_TEST_DEVICE")
if _DEVICE_CHECK:
    import copy as _copy

    from lightning.pytorch import Trainer as _Trainer

    if _DEVICE_CHECK not in ("cuda", "fsdp"):
        raise ValueError(f"LIT_ATTRIB_TEST_DEVICE must be cuda or fsdp, not {_DEVICE_CHECK!r}")
    _trainer_init = _Trainer.__init__

    def _init_on_the_gpu(self, *args, **kwargs):
        kwargs.update(accelerator="cuda", devices=1)
        if _DEVICE_CHECK == "fsdp":
            kwargs["strategy"] = "fsdp"
        _trainer_init(self, *args, **kwargs)

    _Trainer.__init__ = _init_on_the_gpu
    if _DEVICE_CHECK == "fsdp":
        def _on_a_copy(run):
            def stage(self, model=None, *args, **kwargs):
                return run(self, _copy.deepcopy(model), *args, **kwargs)
            return stage

        for _stage in ("fit", "validate", "test", "predict"):
            setattr(_Trainer, _stage, _on_a_copy(getattr(_Trainer, _stage)))
        _assert_close = torch.testing.assert_close

        def _to_float32_precision(actual, expected, *args, rtol=None, atol=None, **kwargs):
            if isinstance(expected, torch.Tensor) and expected.is_floating_point() and expected.numel():
                scale = float(expected.detach().abs().max())
                rtol, atol = max(rtol or 0, 1e-5), max(atol or 0, 1e-5 * scale)
            return _assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

        torch.testing.assert_close = _to_float32_precision


def pytest_runtest_logreport(report) -> None:
    """With LIT_ATTRIB_TEST_FAILURES=FILE, each failure's traceback is appended to FILE as it happens (a run stopped
    at a time limit, as the GPU check's may be, still says why each test failed). Written once, by the controller
    under xdist."""
    path = os.environ.get("LIT_ATTRIB_TEST_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as handle:
            handle.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


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


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, warnings: bool = False,
            in_process: bool = False) -> subprocess.CompletedProcess:
    """Run ``lit-attrib ARGS`` in a subprocess (as a user would) and return the finished process.

    ``tests/`` is on the subprocess's path, so configs may name test helpers by class_path. Warnings are
    off unless ``warnings`` (then as a user sees them: Python's own filters, no PYTHONWARNINGS).

    ``in_process`` runs the same entry point (``lit_attrib.cli.main``) in this process instead, with its output
    captured: each start of a new interpreter costs seconds of imports (torch, Lightning, transformers), and a
    one-process command checked only for its files and messages loses nothing by skipping them. DDP runs, kills
    and checks of what a user's terminal shows stay in a subprocess.
    """
    if in_process:
        return _run_cli_here(list(args), cwd)
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    if warnings:
        del env["PYTHONWARNINGS"]
    return subprocess.run(
        [sys.executable, "-m", "lit_attrib", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _run_cli_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``lit-attrib ARGS`` through ``main`` in this process: stdout, stderr (logging's stream handlers included)
    captured, the exit code as a subprocess would report it, and the working directory, environment, warning
    filters and random state restored afterwards."""
    import contextlib
    import gc
    import io
    import logging
    import traceback
    import warnings as _warnings

    from lit_attrib.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = [h for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                if isinstance(logger, logging.Logger) for h in logger.handlers
                if type(h) is logging.StreamHandler]  # exactly: not FileHandler and the like
    streams = [h.stream for h in handlers]
    environ, here, rng = dict(os.environ), os.getcwd(), torch.get_rng_state()
    code = 0
    try:
        os.chdir(cwd)
        for handler in handlers:
            handler.setStream(err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int | None):
                    print(exc.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - reported as the interpreter would, with exit code 1
                traceback.print_exc()
                code = 1
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_rng_state(rng)
        gc.collect()
    return subprocess.CompletedProcess(["lit-attrib", *args], code, out.getvalue(), err.getvalue())


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
