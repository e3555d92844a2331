"""The gradient index on disk: per-process shards of projected per-example gradients (``.npy``, read
memory-mapped), their example ids, the projected curvature, and ``index.json`` written last.

::

    index.json                    format, layers and their projection sizes, seed, dtype, rows, shards
    rows-rank000.npy              (N_0, width) float16 or float32, one row per example
    ids-rank000.npy               (N_0,) int64 dataset indices
    curvature.safetensors         per layer: projected A and G, their float64 eigendecompositions
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lit_attrib.errors import ArtifactError
from lit_attrib.io import atomic_path, write_json

__all__ = ["FORMAT", "METADATA_FILE", "index_exists", "read_index", "write_curvature", "write_metadata", "write_shard"]

FORMAT = "lit_attrib.gradient_index/1"
METADATA_FILE = "index.json"
CURVATURE_FILE = "curvature.safetensors"


def index_exists(folder: str | os.PathLike) -> bool:
    return (Path(folder) / METADATA_FILE).is_file()


def write_shard(folder: str | os.PathLike, rank: int, rows: np.ndarray, ids: np.ndarray) -> list[str]:
    """Write one process's rows and ids atomically; returns the file names."""
    folder = Path(folder)
    names = [f"rows-rank{rank:03d}.npy", f"ids-rank{rank:03d}.npy"]
    for name, array in zip(names, (rows, ids)):
        with atomic_path(folder / name) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
    return names


def write_curvature(folder: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(Path(folder) / CURVATURE_FILE) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})


def write_metadata(folder: str | os.PathLike, metadata: dict) -> None:
    """``index.json``, last: its presence vouches for the shards it lists."""
    write_json(Path(folder) / METADATA_FILE, {"format": FORMAT, **metadata})


def read_index(folder: str | os.PathLike) -> tuple[dict, list[np.ndarray], np.ndarray, dict[str, torch.Tensor]]:
    """``(metadata, row shards (memory-mapped), ids, curvature tensors)``.

    Raises:
        ArtifactError: no complete index, a missing or damaged shard, or shards that disagree with the metadata.
    """
    folder = Path(folder)
    if not index_exists(folder):
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise ArtifactError(f"no gradient index in '{folder}' (expected {METADATA_FILE}; found {found}); build one "
                            f"with GradientIndexCallback")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"'{folder / METADATA_FILE}' is format {metadata.get('format')!r}, expected {FORMAT!r}")
    shards, ids = [], []
    for rows_name, ids_name in metadata["shards"]:
        try:
            rows = np.load(folder / rows_name, mmap_mode="r")
            shard_ids = np.load(folder / ids_name)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"shard '{folder / rows_name}' cannot be read ({exc}); the index is damaged: "
                                f"build it again") from None
        if rows.ndim != 2 or rows.shape[1] != metadata["width"] or rows.shape[0] != shard_ids.shape[0]:
            raise ArtifactError(f"shard '{folder / rows_name}' has shape {rows.shape} with {shard_ids.shape[0]} ids; "
                                f"the index says rows of width {metadata['width']}: it is damaged, build it again")
        shards.append(rows)
        ids.append(shard_ids)
    ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    if len(ids) == 0:
        raise ArtifactError(f"the gradient index in '{folder}' holds no rows")
    curvature = load_file(str(folder / CURVATURE_FILE)) if (folder / CURVATURE_FILE).is_file() else {}
    return metadata, shards, ids, curvature
