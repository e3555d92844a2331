"""The gradient index on disk: per-process shards of projected per-example gradients (``.npy``, read
memory-mapped), their example ids, the projected curvature, and ``index.json`` written last.

::

    index.json                    format, layers and their projection sizes, seed, dtype, rows, shards,
                                  how the rows were collected ("collection")
    rows-rank000.npy              (N_0, width) float16 or float32, one row per example
    ids-rank000.npy               (N_0,) int64 dataset indices, ascending; rank r's ids all precede rank r+1's
    curvature.safetensors         per layer: projected A and G, their float64 eigendecompositions

While a build runs, each process writes its rows in **parts** (``part-rank000-00000.safetensors``: rows in
the computation's dtype, their ids, and the curvature sums of those rows, one atomic file each) next to
``progress.json`` (the build's arguments). A build killed part-way keeps its finished parts and resumes
from them. At the end every process merges the parts of **all** processes into its one shard, the
contiguous range of the sorted ids assigned to its rank (rows of the same id summed: in ``fit`` an
example seen in several steps or epochs), ``index.json`` is written last and the parts are removed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lit_attrib.errors import ArtifactError
from lit_attrib.io import atomic_path, write_json

__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "PROGRESS_FILE",
    "index_exists",
    "list_parts",
    "merge_parts",
    "part_ids",
    "part_name",
    "part_sums",
    "read_index",
    "read_norms",
    "read_progress",
    "remove_build_files",
    "shard_names",
    "storage_tensor_dtype",
    "write_curvature",
    "write_metadata",
    "write_norms",
    "write_part",
    "write_progress",
    "write_shard",
]

FORMAT = "lit_attrib.gradient_index/1"
METADATA_FILE = "index.json"
CURVATURE_FILE = "curvature.safetensors"
PROGRESS_FILE = "progress.json"
PART_FORMAT = "lit_attrib.gradient_index.part/1"
_IN_MEMORY_BYTES = 1 << 31  # shards up to 2 GiB are summed in memory, larger ones in a memory-mapped file
_PART = re.compile(r"part-rank(\d{3})-(\d{5})\.safetensors")


def index_exists(folder: str | os.PathLike) -> bool:
    return (Path(folder) / METADATA_FILE).is_file()


def shard_names(rank: int) -> list[str]:
    """The file names of one process's shard: its rows, their example ids and the rows' norms (float32, of the
    stored values: they bound the error of a search that multiplies in the storage dtype)."""
    return [f"rows-rank{rank:03d}.npy", f"ids-rank{rank:03d}.npy", f"norms-rank{rank:03d}.npy"]


def write_norms(path: str | os.PathLike, rows: np.ndarray) -> None:
    """The Euclidean norm of each stored row (computed in float64 a block at a time), atomically, as float32
    rounded up so that it never understates the norm."""
    norms = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), 16384):
        exact = np.linalg.norm(np.asarray(rows[start:start + 16384], dtype=np.float64), axis=1)
        norms[start:start + 16384] = np.nextafter(exact.astype(np.float32), np.float32(np.inf))
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, norms)


def read_norms(folder: str | os.PathLike, metadata: dict, shards: list[np.ndarray]) -> list[np.ndarray] | None:
    """Each shard's row norms, or ``None`` for an index written without them.

    Raises:
        ArtifactError: a norms file that cannot be read or does not match its shard.
    """
    if not all(len(names) > 2 for names in metadata["shards"]):
        return None
    norms = []
    for names, rows in zip(metadata["shards"], shards):
        try:
            values = np.load(Path(folder) / names[2])
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"'{Path(folder) / names[2]}' cannot be read ({exc}); the index is damaged: build it "
                                f"again") from None
        if values.shape != (len(rows),) or not np.isfinite(values).all():
            raise ArtifactError(f"'{Path(folder) / names[2]}' does not hold one finite norm per row of "
                                f"'{Path(folder) / names[0]}': the index is damaged, build it again")
        norms.append(values)
    return norms


def part_name(rank: int, sequence: int) -> str:
    return f"part-rank{rank:03d}-{sequence:05d}.safetensors"


def list_parts(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """The finished parts in ``folder``: ``{name: (rank, sequence)}`` in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {path.name: _PART.fullmatch(path.name) for path in folder.iterdir()}
    return {name: (int(m[1]), int(m[2])) for name, m in sorted(found.items()) if m}


def write_part(folder: str | os.PathLike, rank: int, sequence: int, rows: torch.Tensor, ids: torch.Tensor,
               sums: dict[str, torch.Tensor]) -> str:
    """One process's rows since its last part, their ids and curvature sums, as one atomic file."""
    name = part_name(rank, sequence)
    tensors = {"rows": rows.contiguous().cpu(), "ids": ids.to(torch.int64).contiguous().cpu(),
               **{f"sums.{k}": v.contiguous().cpu() for k, v in sums.items()}}
    with atomic_path(Path(folder) / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": PART_FORMAT})
    return name


def _open_part(folder: Path, name: str):
    try:
        handle = safe_open(str(folder / name), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"part '{folder / name}' of an unfinished gradient index cannot be read ({exc}); delete "
                            f"it (its rows are then computed again) or build the index afresh") from None
    if handle.metadata().get("format") != PART_FORMAT:
        raise ArtifactError(f"'{folder / name}' is not a part of a gradient index (format "
                            f"{handle.metadata().get('format')!r}, expected {PART_FORMAT!r})")
    return handle


def part_ids(folder: str | os.PathLike, name: str) -> np.ndarray:
    return _open_part(Path(folder), name).get_tensor("ids").numpy()


def part_sums(folder: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The curvature sums of the parts ``names``, added up (``<layer>.activation``, ``.gradient``, ``.tokens``)."""
    total: dict[str, torch.Tensor] = {}
    for name in names:
        handle = _open_part(Path(folder), name)
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if key.startswith("sums."):
                value = handle.get_tensor(key)
                total[key[5:]] = value if key[5:] not in total else total[key[5:]] + value
    return total


def merge_parts(folder: str | os.PathLike, names: list[str], rank: int, world_size: int, width: int,
                storage: np.dtype, duplicates: str = "sum") -> int:
    """Write rank ``rank``'s shard from the parts ``names`` of every process; returns its number of rows.

    The sorted distinct ids of all parts are cut into ``world_size`` contiguous ranges; this rank's shard holds
    the ids of range ``rank``, each row the sum of that id's rows (``duplicates="sum"``) or, with
    ``duplicates="refuse"``, its only row (an id met twice is an error). Rows are summed in the parts' dtype
    (in memory up to 2 GiB, else in a memory-mapped temporary file), then cast to ``storage``.

    Raises:
        ArtifactError: a damaged part, or (``refuse``) an id in more than one row.
    """
    folder = Path(folder)
    ids = [part_ids(folder, name) for name in names]
    every = np.concatenate(ids) if ids else np.empty(0, np.int64)
    distinct = np.unique(every)
    if duplicates == "refuse":
        _refuse_duplicates(every, distinct)
    start, stop = len(distinct) * rank // world_size, len(distinct) * (rank + 1) // world_size
    mine = distinct[start:stop]
    accumulate = torch.float64 if any(_open_part(folder, n).get_slice("rows").get_dtype() == "F64" for n in names) \
        else torch.float32
    rows_name, ids_name, norms_name = shard_names(rank)
    with atomic_path(folder / rows_name) as tmp:
        in_memory = len(mine) * width * accumulate.itemsize <= _IN_MEMORY_BYTES
        if in_memory:  # the common case: no page faults of a file-backed map, and torch's fast float16 cast
            total = torch.zeros(len(mine), width, dtype=accumulate)
        else:
            mapped = np.lib.format.open_memmap(f"{tmp}.sum", mode="w+", dtype=np.dtype(str(accumulate)[6:]),
                                               shape=(len(mine), width))
            total = torch.from_numpy(mapped)
        try:
            for name, part in zip(names, ids):
                # mine is a contiguous run of the sorted distinct ids: a range test is a membership test
                keep = (part >= mine[0]) & (part <= mine[-1]) if len(mine) else np.zeros(len(part), bool)
                if not keep.any():
                    continue
                rows = _open_part(folder, name).get_tensor("rows")
                if rows.shape != (len(part), width):
                    raise ArtifactError(f"part '{folder / name}' holds rows of shape {tuple(rows.shape)} for "
                                        f"{len(part)} ids of width {width}: it is damaged; delete it and resume, or "
                                        f"build afresh")
                positions = torch.from_numpy(np.searchsorted(mine, part[keep]))
                total.index_add_(0, positions, rows[torch.from_numpy(keep)].to(accumulate))
            if in_memory:
                stored = _stored(total, storage)
                with open(tmp, "wb") as handle:
                    np.save(handle, stored)
            else:
                stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=storage, shape=(len(mine), width))
                for block in range(0, len(mine), 65536):
                    stored[block:block + 65536] = total[block:block + 65536].numpy()
                stored.flush()
            write_norms(folder / norms_name, stored)  # of the stored values, before the rows file is in place
            del stored
        finally:
            if not in_memory:
                del total, mapped
                Path(f"{tmp}.sum").unlink(missing_ok=True)
    with atomic_path(folder / ids_name) as tmp, open(tmp, "wb") as handle:
        np.save(handle, mine.astype(np.int64))
    return len(mine)


def write_shard(folder: str | os.PathLike, rank: int, rows: torch.Tensor, ids: np.ndarray, storage: np.dtype) -> int:
    """Rank ``rank``'s shard straight from the rows of a one-process build held in memory (each id once, no
    parts to merge), in id order; returns its number of rows.

    Raises:
        ArtifactError: an id in more than one row.
    """
    folder = Path(folder)
    _refuse_duplicates(ids, np.unique(ids))
    order = np.argsort(ids, kind="stable")
    rows_name, ids_name, norms_name = shard_names(rank)
    stored = _stored(rows[torch.from_numpy(order)], storage)
    with atomic_path(folder / rows_name) as tmp, open(tmp, "wb") as handle:
        np.save(handle, stored)
    write_norms(folder / norms_name, stored)
    with atomic_path(folder / ids_name) as tmp, open(tmp, "wb") as handle:
        np.save(handle, ids[order].astype(np.int64))
    return len(ids)


def storage_tensor_dtype(storage: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy storage dtype (``float16`` → ``torch.float16``)."""
    return torch.from_numpy(np.empty(0, dtype=storage)).dtype


def _stored(rows: torch.Tensor, storage: np.dtype) -> np.ndarray:
    return rows.to(storage_tensor_dtype(storage)).numpy()


def _refuse_duplicates(every: np.ndarray, distinct: np.ndarray) -> None:
    if len(distinct) != len(every):
        values, counts = np.unique(every, return_counts=True)
        raise ArtifactError(f"example ids {values[counts > 1][:8].tolist()} were indexed more than once; each row of "
                            f"the data must have its own example id")


def write_progress(folder: str | os.PathLike, progress: dict) -> None:
    write_json(Path(folder) / PROGRESS_FILE, progress)


def read_progress(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / PROGRESS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def remove_build_files(folder: str | os.PathLike, names: list[str] | None = None) -> None:
    """Remove the parts ``names`` (default: every part) and the progress file of a build."""
    folder = Path(folder)
    for name in list_parts(folder) if names is None else names:
        (folder / name).unlink(missing_ok=True)
    if names is None:
        (folder / PROGRESS_FILE).unlink(missing_ok=True)


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
    for rows_name, ids_name, *_ in metadata["shards"]:
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
