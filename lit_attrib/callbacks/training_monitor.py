"""TrainingMonitor: learning rate, throughput and memory, logged with the training loss."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import psutil
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_attrib.engine.task import Task
from lit_attrib.errors import ConfigError

__all__ = ["TrainingMonitor"]


class TrainingMonitor(Callback):
    """Log ``train/lr``, ``train/samples_per_sec``, ``train/tokens_per_sec`` and ``train/memory_mb``.

    Throughput is averaged over the last ``window`` batches and counts non-padding tokens; under DDP it
    is the rank-zero rate times the world size. Memory is the peak CUDA allocation when training on a
    GPU, the process's resident set size otherwise. Values follow ``trainer.log_every_n_steps``.

    Args:
        window: number of recent batches the throughput is averaged over.
        task: how to read the batch size, token ids and padding from a batch
            (:class:`lit_attrib.engine.Task`); the default reads dict batches and tuples.
    """

    def __init__(self, window: int = 20, task: Task | None = None) -> None:
        if window < 1:
            raise ConfigError(f"window must be at least 1; got {window}")
        self.window = window
        self._task = task or Task()  # batch size and tokens: dict batches (input_ids, attention_mask) or tuples
        self._times: deque[float] = deque(maxlen=window)
        self._samples: deque[int] = deque(maxlen=window)
        self._tokens: deque[int] = deque(maxlen=window)
        self._start = 0.0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._times.append(time.perf_counter() - self._start)
        task = self._task
        self._samples.append(task.batch_size(batch))
        mask, ids = task.padding_mask(batch), task.input_ids(batch)
        self._tokens.append(int(mask.sum()) if mask is not None else ids.numel() if ids is not None else 0)
        elapsed = max(sum(self._times), 1e-9)
        world = trainer.world_size
        metrics = {
            "train/samples_per_sec": world * sum(self._samples) / elapsed,
            "train/tokens_per_sec": world * sum(self._tokens) / elapsed,
            "train/memory_mb": self._memory_mb(pl_module.device),
        }
        if trainer.optimizers:
            metrics["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self._samples[-1])

    @staticmethod
    def _memory_mb(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return psutil.Process().memory_info().rss / 2**20
