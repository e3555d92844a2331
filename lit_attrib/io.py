"""Atomic artifact writes: a crash or Ctrl-C never leaves a half-written file behind.

Every file is written to a temporary sibling and moved into place with :func:`os.replace`, which is
atomic on POSIX and Windows when source and target share a directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from lit_attrib.errors import ArtifactError

__all__ = ["ScratchTensors", "atomic_open", "atomic_path", "default_permissions", "load_checkpoint", "load_state_checked",
           "read_jsonl", "save_tensors_streaming", "write_json", "write_jsonl"]

_IO_CHUNK = 1 << 30  # bytes per pread/pwrite call (Linux moves at most ~2 GiB per call)


def default_permissions(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give a temporary file (``mode`` 0o666) or folder (0o777) the permissions a plain ``open`` or ``mkdir``
    would have, after the umask (``mkstemp`` / ``mkdtemp`` make them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path`` by name (e.g. ``safetensors.save_file``).

    On success the temporary file is moved onto ``path``; on any exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success move it onto ``path``.

    On any exception (including ``KeyboardInterrupt``) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


_HEADER_ROOM = 2**20
"""Bytes kept in front of the data for the header of a streamed safetensors file (about 8000 tensors)."""


def save_tensors_streaming(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                           metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from ``(name, tensor)`` pairs made one at a time, atomically.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; here each tensor's bytes go to
    disk as soon as the iterable yields it (a generator can then make them one by one). The header, known
    only at the end, goes into room left in front of the data, padded with spaces as the format allows
    (a header too large for the room is put in front by copying the data once). The result loads with
    ``safetensors``. Tensors may share memory (each is written as its own bytes).
    """
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    with atomic_path(path) as tmp:
        with open(tmp, "r+b") as out:
            out.seek(_HEADER_ROOM)
            for name, tensor in tensors:
                if name in header or name == "__metadata__":
                    raise ValueError(f"tensor name '{name}' is used twice (or reserved)")
                tensor = tensor.detach().cpu().contiguous()
                if tensor.dtype not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor '{name}': dtype {tensor.dtype} has no safetensors code")
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                out.write(memoryview(raw))
                header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + raw.nbytes]}
                offset += raw.nbytes
                del tensor, raw
            head = json.dumps({**({"__metadata__": metadata} if metadata else {}), **header},
                              separators=(",", ":")).encode()
            if len(head) <= _HEADER_ROOM - 8:
                out.seek(0)
                out.write(struct.pack("<Q", _HEADER_ROOM - 8) + head + b" " * (_HEADER_ROOM - 8 - len(head)))
                return
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
        moved = tmp.with_name(tmp.name + ".data")
        os.replace(tmp, moved)
        try:
            with open(moved, "rb") as data, open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(head)) + head)
                data.seek(_HEADER_ROOM)
                shutil.copyfileobj(data, out, 16 * 2**20)
        finally:
            os.unlink(moved)


class ScratchTensors(Mapping[str, torch.Tensor]):
    """Named fixed-shape tensors in one scratch file: written in row ranges, read back one at a time.

    Only the tensor being read is resident: each read goes into a buffer kept per shape and dtype (so a
    returned tensor is valid until the next read of that shape and dtype), and the file's pages stay in the
    OS's page cache, outside the process's memory. Reads and writes are plain ``pread``/``pwrite``: a
    memory map would count the pages it touches in the resident set. :meth:`close` deletes the file.

    Args:
        path: the file (created, or truncated).
        layouts: ``name -> (shape, dtype)`` of each tensor; the first axis is the rows.
        device: where read tensors are returned (through a buffer there, also kept per shape and dtype).
    """

    def __init__(self, path: str | os.PathLike, layouts: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._layouts: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        offset = 0
        for name, (shape, dtype) in layouts.items():
            self._layouts[name] = (tuple(shape), dtype, offset)
            offset += math.prod(shape) * dtype.itemsize
        self._device = torch.device(device)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, offset)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype, offset = self._layout(name)
        buffer = self._buffers.get((shape, dtype, "cpu"))
        if buffer is None:
            buffer = self._buffers[(shape, dtype, "cpu")] = torch.empty(shape, dtype=dtype)
        view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            read = os.preadv(self._fd, [view[done:done + _IO_CHUNK]], offset + done)
            if read == 0:
                raise ArtifactError(f"scratch file '{self.path}' ended early reading '{name}' (was it truncated?)")
            done += read
        if self._device.type == "cpu":
            return buffer
        held = self._buffers.get((shape, dtype, "device"))
        if held is None:
            held = self._buffers[(shape, dtype, "device")] = torch.empty(shape, dtype=dtype, device=self._device)
        return held.copy_(buffer)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Put ``rows (k, *shape[1:])`` at rows ``start … start + k`` of tensor ``name``."""
        shape, dtype, offset = self._layout(name)
        if tuple(rows.shape[1:]) != shape[1:] or not 0 <= start <= start + len(rows) <= shape[0]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} at {start} do not fit '{name}' of shape {shape}")
        data = rows.detach().to("cpu", dtype).contiguous()
        view = memoryview(data.view(-1).view(torch.uint8).numpy())
        position = offset + start * math.prod(shape[1:]) * dtype.itemsize
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:done + _IO_CHUNK], position + done)

    def _layout(self, name: str) -> tuple[tuple[int, ...], torch.dtype, int]:
        if self._fd is None:
            raise RuntimeError(f"scratch file '{self.path}' is closed")
        return self._layouts[name]

    def close(self) -> None:
        """Delete the file and drop the buffers (safe to call twice)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
        self._buffers.clear()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file into a list of dicts (blank lines are skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False,
                    opt_in: str = "pass trust_pickle=True") -> dict:
    """A Lightning (or plain ``torch.save``) checkpoint as a dict, read on the CPU.

    Read with ``torch.load(weights_only=True)``, which builds tensors and plain containers only
    (lit_attrib's own checkpoints are such files). A file that pickles other objects is refused: unpickling
    it would run code stored in the file. With ``trust_pickle`` such a file is unpickled, with a warning.

    Args:
        path: the checkpoint file.
        trust_pickle: unpickle a file the safe loader refuses (only for files from a trusted source).
        opt_in: how the caller's user sets ``trust_pickle``, for the error message (e.g. "set
            SketchedGradCallback's trust_checkpoints: true").

    Raises:
        ArtifactError: the file is missing, unreadable, or needs unpickling and ``trust_pickle`` is false.
    """
    if not Path(path).is_file():
        raise ArtifactError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's safe unpickler met something other than tensors and containers
        reason = _unsafe_reason(exc)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ArtifactError(f"checkpoint '{path}' cannot be read (corrupt, or not a torch checkpoint): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not trust_pickle:
        raise ArtifactError(
            f"checkpoint '{path}' is refused by torch's safe loader (weights_only): {reason}. Loading it needs "
            f"unpickling, which runs code stored in the file. If you trust the file and where it came from, "
            f"{opt_in}; otherwise use a checkpoint written by lit_attrib (those load without unpickling)"
        ) from None
    warnings.warn(f"checkpoint '{path}' was unpickled (weights_only=False), as trusted; unpickling runs code stored in "
                  f"the file (torch's safe loader refused it: {reason})", UserWarning, stacklevel=2)
    return torch.load(path, map_location="cpu", weights_only=False)


def _unsafe_reason(exc: BaseException) -> str:
    """The part of torch's ``weights_only`` error that says what it refused (e.g. the global's name)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use|\n\n|$)", text, re.DOTALL)
    reason = (match.group(1) if match else text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return " ".join(reason.split()).rstrip(".")


def load_state_checked(module: Any, checkpoint: dict, source: str) -> None:
    """Load a checkpoint's ``state_dict`` into ``module``, or raise an :class:`ArtifactError` naming the
    missing, unexpected and mis-shaped keys (a checkpoint of another model)."""
    state = checkpoint.get("state_dict", checkpoint.get("model_state_dict", checkpoint))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    partial = getattr(module, "strict_loading", True) is False  # e.g. LoRA: checkpoints hold only what is trained
    if partial:
        trained = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        missing = [k for k in missing if k in trained]
        fingerprint = getattr(module, "base_fingerprint", None)
        if fingerprint is None or checkpoint.get("lit_attrib_base") != fingerprint():
            raise ArtifactError(
                f"checkpoint '{source}' holds only trained weights (e.g. LoRA adapters), and nothing shows they were "
                f"trained on this base model with these settings (saved {checkpoint.get('lit_attrib_base')}); build the "
                f"model as it was built for training"
            )
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ArtifactError(
            f"checkpoint '{source}' is from another model than {type(module).__name__}: "
            + "; ".join(part for part in (f"missing {missing[:6]}" if missing else "",
                                          f"unexpected {unexpected[:6]}" if unexpected else "",
                                          f"shapes differ: {shapes[:4]}" if shapes else "") if part)
            + ". Use checkpoints of the model this run builds"
        )
    module.load_state_dict(state, strict=not partial)
