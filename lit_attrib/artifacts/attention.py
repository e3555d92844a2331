"""The attention artifact of :class:`~lit_attrib.callbacks.AttentionCaptureCallback`.

A capture folder holds:

- ``attention.safetensors``: the summed ``mass`` ``(3, layers, heads, classes)`` float32 (signed,
  positive and negative parts of the attention on each class of key tokens), ``queries_per_layer``
  ``(layers,)``, ``lambda`` ``(layers,)`` for a differential model, and for each kept example (by
  dataset index) ``<index>/layer<L>`` ``(heads, queries, keys)`` float32 maps over its real tokens,
  ``<index>/input_ids``, ``<index>/queries`` (positions counted from the first real token) and
  ``<index>/token_class``;
- ``allocation.json`` (written last): the arguments, model, layers, heads, classes, λ per layer,
  the allocation ratios, counts and which examples the maps hold;
- ``allocation.md`` and ``plots/*.png``: the summary table and the heatmaps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lit_attrib.errors import DataError
from lit_attrib.io import atomic_path

__all__ = ["FORMAT", "METADATA_FILE", "TENSORS_FILE", "attention_exists", "load_attention", "save_attention"]

FORMAT = "lit_attrib.attention/1"
TENSORS_FILE = "attention.safetensors"
METADATA_FILE = "allocation.json"
_EXAMPLE_KEYS = ("input_ids", "queries", "token_class")


def save_attention(folder: str | os.PathLike, mass: torch.Tensor, queries_per_layer: torch.Tensor,
                   lambdas: list[float] | None, examples: dict[int, dict]) -> None:
    """Write ``attention.safetensors`` atomically (the metadata file is the caller's, written after it).

    Args:
        folder: the capture folder.
        mass: ``(3, layers, heads, classes)`` summed mass (stored as float32).
        queries_per_layer: ``(layers,)`` query rows behind each layer's sums.
        lambdas: λ of each captured layer, in order (``None`` or empty for a plain model).
        examples: per dataset index, ``input_ids``, ``queries``, ``token_class`` and ``maps``
            (layer index -> ``(heads, queries, keys)`` float32 map).
    """
    tensors = {"mass": mass.float().contiguous(), "queries_per_layer": queries_per_layer.float()}
    if lambdas:
        tensors["lambda"] = torch.tensor(lambdas)
    for index, example in examples.items():
        for key in _EXAMPLE_KEYS:
            tensors[f"{index}/{key}"] = example[key].contiguous()
        for layer, maps in example["maps"].items():
            tensors[f"{index}/layer{layer}"] = maps
    with atomic_path(Path(folder) / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def attention_exists(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a complete attention capture."""
    folder = Path(folder)
    return all((folder / file).is_file() for file in (METADATA_FILE, TENSORS_FILE))


def load_attention(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(allocation.json, tensors of attention.safetensors)`` of a capture folder.

    Raises:
        DataError: a file of the capture is missing.
    """
    folder = Path(folder)
    for file in (METADATA_FILE, TENSORS_FILE):
        if not (folder / file).is_file():
            raise DataError(f"'{folder}' holds no attention capture: {file} is missing (run AttentionCaptureCallback)")
    return json.loads((folder / METADATA_FILE).read_text()), load_file(str(folder / TENSORS_FILE))
