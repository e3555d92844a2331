"""The `lit-attrib` command: every shipped YAML parses, --help is complete, errors are one clear line."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from lit_attrib.callbacks import (
    AttentionCaptureCallback,
    InfluenceCallback,
    SketchedGradCallback,
    TokenInfluenceCallback,
)
from lit_attrib.cli import main
from lit_attrib.data import MultipleChoiceDataModule, NoisyGSM8KDataModule, TextDataModule, TofuDataModule
from lit_attrib.modules import CausalLMModule, EvalModule

# configs of the `lit-attrib noise-robustness` sweep (a tool, not a LightningCLI run) say so by their `models` key
TOOL_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "models" in (yaml.safe_load(p.read_text()) or {}))
CONFIGS = sorted(set((REPO / "configs").glob("*.yaml")) - set(TOOL_CONFIGS))
SNIPPETS = sorted((REPO / "callbacks").glob("*.yaml"))
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _parse(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _layers(config: Path) -> list[str]:
    """A full config (names its model class) parses alone; an overlay parses on top of the quickstart."""
    full = "class_path" in ((yaml.safe_load(config.read_text()) or {}).get("model") or {})
    return ["-c", str(config)] if full else ["-c", QUICKSTART, "-c", str(config)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_every_config_parses(config, subcommand, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _parse([subcommand, *_layers(config), "--print_config"], capsys)
    assert code in (0, None), err
    parsed = yaml.safe_load(out)
    given = yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        for key, value in (given.get(section, {}) or {}).get("init_args", {}).items():
            assert parsed[section]["init_args"][key] == value, (section, key)


@pytest.mark.parametrize("config", TOOL_CONFIGS, ids=lambda p: p.name)
def test_every_sweep_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _parse(["noise-robustness", "-c", str(config), "--print_config"], capsys)
    assert code in (0, None), err
    parsed, given = yaml.safe_load(out), yaml.safe_load(config.read_text())
    assert parsed["models"] == given["models"] and parsed["data"] == given["data"]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_every_callback_snippet_parses(snippet, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _parse(["fit", "-c", QUICKSTART, f"--trainer.callbacks+={snippet}", "--print_config"], capsys)
    assert code in (0, None), err
    class_path = yaml.safe_load(snippet.read_text())["class_path"]
    assert class_path in [c["class_path"] for c in yaml.safe_load(out)["trainer"]["callbacks"]]


def test_a_misspelt_key_is_rejected(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learnin_rate: 0.1\n")
    code, _, err = _parse(["fit", "-c", QUICKSTART, "-c", str(bad), "--print_config"], capsys)
    assert code == 2 and "learnin_rate" in err


def test_unknown_scheduler_is_rejected_with_the_choices(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = _parse(["fit", "-c", QUICKSTART, "--model.init_args.scheduler", "cosine_restarts",
                           "--print_config"], capsys)
    assert code == 2 and "cosine_restarts" in err and "cosine_with_restarts" in err


def _documented(cls) -> dict[str, str]:
    """Argument name -> first words of its description in the class docstring's Args section."""
    args = inspect.getdoc(cls).split("Args:\n", 1)[1]
    found = dict(re.findall(r"^\s{4}(\w+): (.+)$", args, flags=re.MULTILINE))
    return {name: " ".join(text.split()[:4]) for name, text in found.items()}


@pytest.mark.parametrize(("flag", "cls"), [("--model.help", CausalLMModule), ("--data.help", TextDataModule),
                                           ("--data.help", TofuDataModule), ("--model.help", EvalModule),
                                           ("--data.help", NoisyGSM8KDataModule),
                                           ("--data.help", MultipleChoiceDataModule)])
def test_help_documents_every_argument(flag, cls, capsys):
    code, out, _ = _parse(["fit", flag, cls.__name__], capsys)
    assert code == 0
    out = " ".join(out.split())
    documented = _documented(cls)
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind is parameter.VAR_KEYWORD:
            continue
        assert name in documented, f"{cls.__name__}.{name} has no docstring entry"
        assert f"--{flag.split('.')[0][2:]}.{name} " in out, name
        assert documented[name] in out, name


@pytest.mark.parametrize("cls", [InfluenceCallback, TokenInfluenceCallback, SketchedGradCallback,
                                 AttentionCaptureCallback])
def test_callback_help_documents_every_argument(cls, capsys):
    code, out, _ = _parse(["predict", "--trainer.callbacks.help", cls.__name__], capsys)
    assert code == 0
    out = " ".join(out.split())
    documented = _documented(cls)
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert name in documented and documented[name] in out, name


# ------------------------------------------------------------------------ errors, end to end
@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.init_args.input_column", "Input"], r"no column\(s\) \['Input'\]; its columns are \['question'"),
        (["--model.init_args.config", "null", "--model.init_args.pretrained", "./no/such/model"],
         r"model path './no/such/model' does not exist"),
        (["--model.init_args.config", "null", "--model.init_args.pretrained", "TinyLlama/TinyLlama_v1.1"],
         r"could not load model 'TinyLlama/TinyLlama_v1.1' from the Hugging Face hub: offline mode is on"),
        (["--data.init_args.max_length", "6"], r"max_length=6 is shorter than the prompt"),
    ],
    ids=["missing-column", "missing-path", "hub-offline", "max-length"],
)
def test_cli_errors_are_one_clear_message(tmp_path, override, message):
    result = run_cli("fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger", "false", "--trainer.callbacks", "[]", *override, in_process=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"lit-attrib: error: .*" + message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
