"""Loading from a local path or the Hugging Face hub with one clear error when neither works.

Models, tokenizers and datasets are all named the same way: an existing local path, or a hub id such
as ``TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T``. This module decides which one a name is
and turns the hub clients' long tracebacks (offline, typo, gated repo) into one message that says
what was tried and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lit_attrib.errors import LitAttribError

__all__ = ["is_local_name", "load_from_hub_or_path", "offline_mode"]

T = TypeVar("T")


def offline_mode() -> bool:
    """Whether the Hugging Face clients were told to stay offline."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def is_local_name(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id.

    A hub id is ``repo`` or ``owner/repo``; anything that exists on disk, starts like a path
    (``./``, ``../``, ``/``, ``~``), has more than one ``/`` or ends in a data-file suffix is local.
    """
    if Path(name).expanduser().exists():
        return True
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return Path(name).suffix.lower() in {".json", ".jsonl", ".csv", ".parquet", ".txt", ".safetensors", ".bin"}


def load_from_hub_or_path(
    name: str, load: Callable[[str], T], *, what: str, error: type[LitAttribError], hint: str = ""
) -> T:
    """Call ``load(name)``, turning a missing path or an unreachable hub id into ``error``.

    Args:
        name: local path or hub id.
        load: the loader, e.g. ``AutoTokenizer.from_pretrained``.
        what: what is loaded, for the message (``"model"``, ``"tokenizer"``, ``"dataset"``).
        error: the exception type to raise.
        hint: an extra sentence appended to the message.

    Raises:
        error: the path does not exist, or the hub id could not be fetched.
    """
    suffix = f" {hint}" if hint else ""
    if is_local_name(name):
        resolved = Path(name).expanduser()
        if not resolved.exists():
            raise error(
                f"{what} path '{name}' does not exist (resolved to '{resolved.resolve()}', working directory "
                f"'{Path.cwd()}'). Check the path, or give a hub id like 'owner/name'.{suffix}"
            )
        return load(str(resolved))
    try:
        return load(name)
    except (OSError, ValueError, ConnectionError) as exc:
        first_line = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        repo_type = " --repo-type dataset" if what == "dataset" else ""
        mode = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)" if offline_mode() else (
            "the hub could not be reached or has no such repository"
        )
        raise error(
            f"could not load {what} '{name}' from the Hugging Face hub: {mode}. Loader said: {first_line}. "
            f"Fix: check the id, or download it once where there is network (`hf download{repo_type} {name}`) and point "
            f"to the local copy instead.{suffix}"
        ) from None
