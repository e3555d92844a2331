"""Score artifacts (pairwise and token influence) and the chunk store that lets their passes resume.

Pairwise influence: ``scores.safetensors`` (``scores (N_query, N_train)``, ``query_indices``,
``train_indices``, optionally ``token_scores (N_query, N_train, T)``), ``topk.jsonl`` and
``scores.json`` (written last). Token influence: ``token_scores.safetensors`` (``scores (N_query, T)``,
``mask``, ``input_ids``, ``query_indices``), ``token_scores.html`` and ``token_scores.json`` (last).
Rows and columns are in dataset index order.

While a pass runs, each process writes what it has scored to ``<folder>/.chunks-<name>/`` every
``chunk_size`` examples (one safetensors file each, written atomically). A killed pass, run again with
the same arguments, model, factors and queries, skips the examples the chunks already hold; the final
artifact is assembled from the chunks of the examples this pass saw (each process lists them), in
index order (examples repeated by a distributed sampler's padding are kept once), and the chunks
are then removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lit_attrib.errors import ArtifactError
from lit_attrib.io import atomic_path

__all__ = ["ChunkStore", "save_tensors"]

MANIFEST = "manifest.json"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """Write ``tensors`` atomically as safetensors (contiguous CPU copies)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": fmt})


class ChunkStore:
    """Per-process partial results of a scoring pass, kept on disk so that the pass can resume.

    Each added record holds tensors whose first axis is the example; tensors of different records
    may differ in their last axis (the sequence length) and are zero-padded when assembled.

    Args:
        folder: the artifact folder; chunks go to ``folder/.chunks-<name>``.
        name: the artifact's name (callbacks writing to one folder keep their chunks apart).
        fingerprint: what the results depend on (arguments, model checksum, queries). Chunks made
            with another fingerprint are discarded.
        rank: this process's rank (part of the chunk file names).
        chunk_size: examples per chunk file.
    """

    def __init__(self, folder: str | os.PathLike, name: str, fingerprint: dict, rank: int, chunk_size: int) -> None:
        self.folder = Path(folder) / f".chunks-{name}"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from JSON
        self.rank = rank
        self.chunk_size = chunk_size
        self._pending: list[tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]] = []
        self._pending_count = 0
        self._written = 0
        self._seen: list[torch.Tensor] = []

    def prepare(self, is_global_zero: bool) -> str | None:
        """On rank zero: discard stale chunks and write the manifest. Returns why chunks were dropped."""
        if not is_global_zero:
            return None
        reason = None
        manifest = self.folder / MANIFEST
        if self.folder.exists():
            saved = json.loads(manifest.read_text()) if manifest.is_file() else None
            if saved != self.fingerprint:
                reason = ("they were made with other arguments, model weights or queries" if saved is not None
                          else "they have no manifest")
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file():
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(self.fingerprint, indent=1))
        return reason

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.safetensors")) if self.folder.is_dir() else []

    def covered(self) -> set[int]:
        """Dataset indices that the chunks on disk (of every process) already hold."""
        done: set[int] = set()
        for file in self.files():
            with safe_open(str(file), framework="pt") as handle:
                done.update(handle.get_tensor("index").tolist())
        return done

    def see(self, indices: torch.Tensor) -> None:
        """Note indices this pass covers (scored now or by an earlier run)."""
        self._seen.append(indices.detach().cpu())

    def write_seen(self) -> None:
        """This process's list of the pass's indices (call before the barrier that precedes :meth:`assemble`)."""
        seen = torch.cat(self._seen) if self._seen else torch.empty(0, dtype=torch.long)
        with atomic_path(self.folder / f"seen-rank{self.rank:03d}.safetensors") as tmp:
            save_file({"index": seen}, str(tmp))

    def add(self, indices: torch.Tensor, tensors: dict[str, torch.Tensor], texts: list[str] | None = None) -> None:
        self._pending.append((indices.detach().cpu(), {k: v.detach().cpu() for k, v in tensors.items()},
                              list(texts) if texts is not None else [""] * len(indices)))
        self._pending_count += len(indices)
        if self._pending_count >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        indices = torch.cat([record[0] for record in self._pending])
        tensors = {key: _cat_padded([record[1][key] for record in self._pending]) for key in self._pending[0][1]}
        texts = [text for record in self._pending for text in record[2]]
        stamp = f"{self._written:06d}-{uuid.uuid4().hex[:12]}"  # never the name of a chunk of an earlier run
        with atomic_path(self.folder / f"chunk-rank{self.rank:03d}-{stamp}.safetensors") as tmp:
            save_file({"index": indices, **{k: v.contiguous() for k, v in tensors.items()}}, str(tmp),
                      metadata={"texts": json.dumps(texts, ensure_ascii=False)})
        self._written += 1
        self._pending.clear()
        self._pending_count = 0

    def assemble(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """The chunks of the indices this pass saw (every process's list), in dataset index order, each
        index once: ``(indices, tensors, texts)``. Chunks of a killed run over other rows are left out."""
        files = self.files()
        if not files:
            raise ArtifactError(f"no scored examples in '{self.folder}': the pass saw no batches")
        parts, texts = [], []
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                texts.extend(json.loads(handle.metadata()["texts"]))
            parts.append(load_file(str(file)))
        indices = torch.cat([part.pop("index") for part in parts])
        tensors = {key: _cat_padded([part[key] for part in parts]) for key in parts[0]}
        order = torch.argsort(indices, stable=True)
        indices = indices[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        seen_files = sorted(self.folder.glob("seen-rank*.safetensors"))
        if seen_files:
            seen = torch.cat([load_file(str(f))["index"] for f in seen_files])
            first &= torch.isin(indices, seen)
        keep = order[first]
        return indices[first], {key: value[keep] for key, value in tensors.items()}, [texts[i] for i in keep.tolist()]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the first axis, zero-padding the last axis of tensors with more than one axis."""
    if tensors[0].ndim > 1:
        width = max(t.shape[-1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tensors]
    return torch.cat(tensors)
