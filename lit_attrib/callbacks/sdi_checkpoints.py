"""Checkpoint mode of :class:`~lit_attrib.callbacks.SketchedGradCallback` (TracInCP, in ``predict``):
replay each saved checkpoint, sketch the queries per step and the training examples once (cached on disk
per checkpoint, so a killed pass resumes and another query set reuses them), weighted by ``η_c``.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file
from tqdm.auto import tqdm
from typing_extensions import override

from lit_attrib.artifacts.scores import ChunkStore
from lit_attrib.callbacks._common import (
    check_context,
    show_progress,
    tensors_checksum,
)
from lit_attrib.callbacks.sdi_features import _SketchedGradients
from lit_attrib.engine.data import (
    ExampleIds,
    example_checksums,
    is_sharded,
    resolve_loader,
)
from lit_attrib.errors import ArtifactError, ConfigError
from lit_attrib.io import load_checkpoint, load_state_checked

__all__: list[str] = []


def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


class _CheckpointReplay(_SketchedGradients):
    """TracInCP over ``checkpoints`` (a mixin of :class:`SketchedGradCallback`)."""

    # ---------------------------------------------------------------------- checkpoint mode
    def _resolve_checkpoints(self) -> list[str]:
        paths = []
        for entry in self.checkpoints:
            matches = sorted(glob.glob(entry), key=_natural) if glob.has_magic(entry) else [entry]
            if not matches or not Path(matches[0]).is_file():
                raise ArtifactError(f"no checkpoint at '{entry}'; train first (e.g. lit-attrib fit -c "
                                    f"configs/looped_addition.yaml writes runs/looped_addition/checkpoints) or fix "
                                    f"the path")
            paths.extend(matches)
        if isinstance(self.eta, list) and len(self.eta) != len(paths):
            raise ConfigError(f"eta has {len(self.eta)} values for the {len(paths)} checkpoints {paths[:4]}…; give "
                             f"one per checkpoint, one number for all, or null for their learning rates")
        return paths

    def _load_checkpoint(self, pl_module: LightningModule, path: str, position: int) -> dict:
        checkpoint = load_checkpoint(path, trust_pickle=self.trust_checkpoints,
                                     opt_in=f"set {type(self).__name__}'s trust_checkpoints: true")
        load_state_checked(pl_module, checkpoint, path)
        if isinstance(self.eta, list):
            eta = float(self.eta[position])
        elif self.eta is not None:
            eta = float(self.eta)
        else:
            try:
                eta = float(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])
            except (KeyError, IndexError, TypeError):
                raise ArtifactError(f"checkpoint '{path}' holds no optimizer learning rate to weight it by; give eta "
                                    f"(one number or one per checkpoint)") from None
        return {"path": str(path), "eta": eta, "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch")}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.checkpoints is None:
            rank_zero_warn(f"{type(self).__name__}[{self.name}] has no checkpoints: it works online, during fit; in "
                           f"predict it does nothing. Give checkpoints for TracInCP")
            return
        paths = self._resolve_checkpoints()
        if not self.trust_checkpoints:  # refuse a file that needs unpickling before any pass, not at its turn
            for path in paths:
                if torch.serialization.get_unsafe_globals_in_checkpoint(path):
                    load_checkpoint(path, opt_in=f"set {type(self).__name__}'s trust_checkpoints: true")  # raises
        self._setup(trainer, pl_module)
        self._original = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._used = []
        try:
            for position, path in enumerate(tqdm(paths, desc=f"{self.name}: checkpoints",
                                                 disable=not show_progress(trainer) or len(paths) == 1)):
                self._used.append(self._load_checkpoint(pl_module, path, position))
                self._checkpoint_pass(trainer, pl_module, self._used[-1])
        finally:
            pl_module.load_state_dict(self._original)
            self._original = None
        self._finish(trainer, pl_module)

    def _checkpoint_pass(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        pl_module.eval()
        queries, self._query_indices = self._query_features(trainer, pl_module)
        self._tracin.set_queries(queries)
        fingerprint = {"arguments": {k: v for k, v in self.arguments().items()
                                     if k not in ("mode", "queries", "checkpoints", "eta", "every_n_steps")},
                       "modules": list(self.layers), "weights": tensors_checksum(pl_module.state_dict().values()),
                       "steps": self.step_names}
        store = None if self.exact else ChunkStore(  # exact gradients are not cached: they can be huge
            self.folder(trainer), f"{self.name}-sketches-{fingerprint['weights']}", fingerprint, trainer.global_rank,
            self.chunk_size)
        if store is not None and (reason := store.prepare(trainer.is_global_zero)):
            rank_zero_warn(f"{type(self).__name__}[{self.name}]: discarded cached sketches because {reason}")
        trainer.strategy.barrier()
        cached: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        for file in store.files() if store is not None else []:
            part = load_file(str(file))
            for row, (index, checksum) in enumerate(zip(part["index"].tolist(), part["checksum"].tolist())):
                cached[(index, checksum)] = (part["sketch"], row)
        loader = resolve_loader(self.train_data, trainer, pl_module, "the training examples")
        ids = ExampleIds(self._task, f"{type(self).__name__}[{self.name}]")
        count = reused = 0
        presharded = is_sharded(loader)  # a DistributedSampler already gives each process its share
        for position, batch in enumerate(tqdm(loader, desc=f"{self.name}: training set", leave=False,
                                              disable=not show_progress(trainer))):
            if position == 0:
                ids.check(loader, batch, trainer, "the training examples", sharded=presharded)
            indices = ids(batch)  # unsharded: every batch is numbered, also those another process scores
            if not presharded and position % trainer.world_size != trainer.global_rank:
                continue
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            count += len(indices)
            checksums = example_checksums(self._task, batch)
            keys = list(zip(indices.tolist(), checksums.tolist()))
            if all(key in cached for key in keys):
                train = torch.stack([cached[key][0][cached[key][1]] for key in keys]).to(pl_module.device)
                reused += len(keys)
            else:
                check_context(self._task, batch, self._context, "a training example")
                train = self._example_features(trainer, pl_module, batch, per_step=False)
                if store is not None:
                    store.add(indices, {"sketch": train, "checksum": checksums})
            self._tracin.add(indices, train, checkpoint["eta"])
        if store is not None:
            store.flush()
        trainer.strategy.barrier()
        if store is not None and not self.keep_sketches and trainer.is_global_zero:
            store.remove()
        reused = trainer.strategy.reduce(torch.tensor(float(reused), device=pl_module.device), reduce_op="sum")
        checkpoint["reused_examples"] = int(reused)

