"""The gradient index: projected per-example gradients stored once, queried later. Exact at full size
against InfluenceCallback and autograd; unbiased at small size; damaged or foreign indexes refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from reference_models import KillAtStep, KilledRun
from safetensors.torch import load_file
from test_engine import Chunks, TupleLM, _trainer, summed_loss
from torch.utils.data import DataLoader, Dataset, Subset

from lit_attrib.artifacts.index import read_index
from lit_attrib.callbacks import GradientIndexCallback, InfluenceCallback, KFACCollectorCallback
from lit_attrib.engine import Task
from lit_attrib.errors import ArtifactError, ConfigError
from lit_attrib.index import GradientIndex
from lit_attrib.ops.projection import projection_matrix

LAYERS = ["hidden", "head"]


def _build(tmp_path, module, name="index", **kwargs) -> GradientIndex:
    callback = GradientIndexCallback(target_modules=LAYERS, loss_fn=summed_loss, output_dir=str(tmp_path / name),
                                     **{"dtype": "float64", "storage_dtype": "float64", **kwargs})
    _trainer(tmp_path, [callback]).predict(module, DataLoader(Chunks(), batch_size=5), return_predictions=False)
    return GradientIndex(tmp_path / name)


def _queries(index: GradientIndex, module) -> torch.Tensor:
    rows, ids = index.query_rows(module, DataLoader(Subset(Chunks(), [0, 3, 6]), batch_size=2),
                                 task=Task(loss_fn=summed_loss))
    assert ids.tolist() == [0, 1, 2]
    return rows


def test_full_size_kfac_index_equals_influence(tmp_path):
    module = TupleLM()
    index = _build(tmp_path, module, projection_dim=None)
    factors = KFACCollectorCallback(target_modules=LAYERS, strategy="kfac", dtype="float64", plots=False,
                                    loss_fn=summed_loss, output_dir=str(tmp_path / "factors"))
    _trainer(tmp_path, [factors]).predict(module, DataLoader(Chunks(), batch_size=5), return_predictions=False)
    influence = InfluenceCallback(factors=str(tmp_path / "factors"), queries=Subset(Chunks(), [0, 3, 6]),
                                  loss_fn=summed_loss, dtype="float64", output_dir=str(tmp_path / "influence"))
    _trainer(tmp_path, [influence]).predict(module, DataLoader(Chunks(), batch_size=5), return_predictions=False)
    expected = load_file(str(tmp_path / "influence" / "scores.safetensors"))["scores"]
    scores = index.scores(_queries(index, module))
    assert index.ids.tolist() == list(range(len(Chunks())))
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))


def _exact_dot_products(module) -> torch.Tensor:
    """⟨∇L(z_q), ∇L(z_m)⟩ over the tracked layers' weights and biases, by autograd."""
    parameters = [p for name in LAYERS for p in module.get_submodule(name).parameters()]

    def gradient(x, y):
        loss = summed_loss(module, (x[None], y[None])).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])

    rows = Chunks().rows
    train = torch.stack([gradient(x, y) for x, y in rows])
    return train[[0, 3, 6]] @ train.T


def test_full_size_identity_index_equals_gradient_dot_products(tmp_path):
    module = TupleLM()
    index = _build(tmp_path, module, projection_dim=None, curvature=False)
    expected = _exact_dot_products(module)
    torch.testing.assert_close(index.scores(_queries(index, module), curvature="identity"), expected,
                               rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    with pytest.raises(ArtifactError, match="holds no curvature"):
        index.scores(_queries(index, module))


def test_small_projections_are_unbiased(tmp_path):
    module = TupleLM()
    expected = _exact_dot_products(module)
    samples = torch.stack([
        (lambda index: index.scores(_queries(index, module), curvature="identity"))(
            _build(tmp_path, module, name=f"seed{seed}", projection_dim=4, seed=seed, curvature=False))
        for seed in range(64)])
    mean, error = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    z = (mean - expected) / error  # per entry, over 64 seeds
    assert float((z.abs() <= 3).float().mean()) >= 0.95, z  # unbiased: within 3 SE (a heavy tail allows a few out)
    assert abs(float(z.mean())) < 3 / z.numel() ** 0.5, z  # and no shared bias across the entries
    assert float((samples.std(0) / expected.abs().clamp(min=1e-9)).median()) > 0.05  # the projection is lossy


def test_foreign_empty_and_damaged_indexes_are_refused(tmp_path):
    module = TupleLM()
    index = _build(tmp_path, module, projection_dim=4)
    wider = TupleLM()
    wider.head = torch.nn.Linear(8, 20).double()
    with pytest.raises(ArtifactError, match="built on other layers"):
        index.query_rows(wider, [], task=Task(loss_fn=summed_loss))
    with pytest.raises(ArtifactError, match="no gradient index"):
        GradientIndex(tmp_path / "nothing")
    shard = tmp_path / "index" / "rows-rank000.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="damaged"):
        GradientIndex(tmp_path / "index")


# ------------------------------------------------------------------------------ in fit
class IndexedChunks(Dataset):
    """``(x, y, index)`` rows: each says which example it is, so shuffling and DDP are harmless."""

    def __init__(self, count: int = 14) -> None:
        self.chunks = Chunks(count)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        return (*self.chunks[i], i)


def indexed_loss(module, batch):
    return summed_loss(module, batch[:2])


INDEXED = Task(loss_fn=indexed_loss, example_ids=lambda batch: batch[2])


class IndexedLM(TupleLM):
    """TupleLM on ``(x, y, index)`` batches; ``optimizer``: plain SGD, SGD whose learning rate grows every
    step (``0.1 · (step + 1)``), or Adam."""

    def __init__(self, lr: float = 0.0, optimizer: str = "sgd") -> None:
        super().__init__(lr=lr)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[:2], batch_idx)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.8, 0.9), eps=1e-3)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer == "sgd":
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 * (step + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class FreezeWeights(Callback):
    """The weights never move (each step's gradient is dropped before the optimizer), while the learning rate
    and its schedule stay what they are: every step sees the same weights as a predict pass."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for parameter in pl_module.parameters():
            parameter.grad = None


class LearningRates(Callback):
    """Which examples each training step saw, and its learning rate."""

    def __init__(self) -> None:
        self.visits: list[tuple[list[int], float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.visits.append((batch[2].tolist(), trainer.optimizers[0].param_groups[0]["lr"]))


def _fit_index(tmp_path, module, loader, name="fit", callbacks=(), max_epochs=2, **kwargs) -> GradientIndexCallback:
    callback = GradientIndexCallback(target_modules=LAYERS, stages=["fit"], output_dir=str(tmp_path / name),
                                     **{"dtype": "float64", "storage_dtype": "float64", "projection_dim": 4, **kwargs})
    _trainer(tmp_path, [callback, *callbacks], max_epochs=max_epochs).fit(module, loader)
    return callback


def _stored(folder) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """``(rows, ids, curvature, metadata)`` as stored, read without the query side."""
    metadata, shards, ids, curvature = read_index(folder)
    return torch.from_numpy(np.concatenate(shards)), torch.from_numpy(ids), curvature, metadata


def _covariances(curvature: dict) -> dict[str, torch.Tensor]:
    """``V diag(λ) Vᵀ`` of each stored eigendecomposition (eigenvectors are defined up to sign)."""
    out = {}
    for key, values in curvature.items():
        if key.endswith("_eigenvalues"):
            vectors = curvature[key.replace("_eigenvalues", "_eigenvectors")]
            out[key] = vectors @ torch.diag(values) @ vectors.T
    return out


def test_fit_collection_equals_a_predict_pass_weighted_by_each_steps_learning_rate(tmp_path):
    """Frozen weights, a learning rate that grows every step, a shuffled loader over 2 epochs: each example's
    row is Σ over its 2 visits of that step's learning rate × its predict-pass row, whatever the order."""
    module = IndexedLM(lr=1.0, optimizer="scheduled")
    _build(tmp_path, module, projection_dim=4)
    rates = LearningRates()
    callback = _fit_index(tmp_path, module, DataLoader(IndexedChunks(), batch_size=5, shuffle=True), task=INDEXED,
                          part_rows=4, callbacks=[FreezeWeights(), rates])
    weights = torch.zeros(len(Chunks()), dtype=torch.float64)
    for ids, lr in rates.visits:
        weights[ids] += lr
    assert sorted({lr for _, lr in rates.visits}) == pytest.approx([0.1 * (s + 1) for s in range(6)])
    rows, ids, curvature, metadata = _stored(tmp_path / "fit")
    expected, expected_ids, expected_curvature, _ = _stored(tmp_path / "index")
    assert ids.tolist() == expected_ids.tolist() == list(range(len(Chunks())))
    torch.testing.assert_close(rows, weights[:, None] * expected, rtol=1e-10, atol=1e-12)
    # The curvature counts every token of both epochs: at frozen weights, the predict pass's expectation.
    fitted, once = _covariances(curvature), _covariances(expected_curvature)
    assert fitted.keys() == once.keys() and len(fitted) == 2 * len(LAYERS)
    for key in once:
        torch.testing.assert_close(fitted[key], once[key], rtol=1e-9, atol=1e-12)
    collection = metadata["collection"]
    assert (collection["stage"], collection["weighting"], collection["steps"], collection["epochs"]) == \
        ("fit", "learning_rate", 6, [0, 1])
    assert collection["rows_added"] == 2 * len(Chunks()) and collection["learning_rate"] == pytest.approx([0.1, 0.6])
    assert callback._tracker._handles == [] and not list((tmp_path / "fit").glob("part-*"))


def test_shuffled_equals_unshuffled_and_positions_key_unshuffled_rows(tmp_path):
    """Unweighted sums over 2 epochs at frozen weights are 2 × the predict rows: with ids and shuffling, and
    with plain (x, y) batches numbered by position."""
    module = TupleLM()
    _build(tmp_path, module, projection_dim=4)
    expected, _, _, _ = _stored(tmp_path / "index")
    _fit_index(tmp_path, module, DataLoader(Chunks(), batch_size=5), name="ordered", weighting="none",
               loss_fn=summed_loss, callbacks=[FreezeWeights()])
    _fit_index(tmp_path, IndexedLM(), DataLoader(IndexedChunks(), batch_size=3, shuffle=True), name="shuffled",
               weighting="none", task=INDEXED, callbacks=[FreezeWeights()])
    for name in ("ordered", "shuffled"):
        rows, ids, _, _ = _stored(tmp_path / name)
        assert ids.tolist() == list(range(len(Chunks())))
        torch.testing.assert_close(rows, 2 * expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="shuffled and its batches carry no example ids"):
        _fit_index(tmp_path, TupleLM(), DataLoader(Chunks(), batch_size=5, shuffle=True), name="refused",
                   loss_fn=summed_loss)


class Snapshots(Callback):
    """Each training step's weights (before the step) and batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict, tuple]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                           tuple(t.clone() for t in batch)))


def _adam_reference(snapshots: Snapshots, lr: float, betas: tuple, eps: float, size: int) -> torch.Tensor:
    """Σ_t lr · P_out (DW_m(θ_t) ⊘ (sqrt(v̂_t) + ε)) P_inᵀ per example, with Adam's second moment replayed from
    the batch gradients of the training loss and per-example gradients by autograd at each step's weights."""
    module = IndexedLM()
    parameters = {f"{name}.{kind}": getattr(module.get_submodule(name), kind) for name in LAYERS
                  for kind in ("weight", "bias")}
    second = {key: torch.zeros_like(p) for key, p in parameters.items()}
    rows = torch.zeros(size, sum(4 * 4 for _ in LAYERS), dtype=torch.float64)
    for step, (weights, batch) in enumerate(snapshots.steps, start=1):
        module.load_state_dict(weights)
        batch_gradient = torch.autograd.grad(module.training_step(batch, 0), list(parameters.values()))
        denominators = {}
        for (key, moment), gradient in zip(second.items(), batch_gradient):
            moment.mul_(betas[1]).add_((1 - betas[1]) * gradient ** 2)
            denominators[key] = (moment / (1 - betas[1] ** step)).sqrt() + eps
        for row, index in enumerate(batch[2].tolist()):
            loss = indexed_loss(module, tuple(t[row:row + 1] for t in batch)).sum()
            gradients = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
            blocks = []
            for name in LAYERS:
                dw = torch.cat([gradients[f"{name}.weight"], gradients[f"{name}.bias"][:, None]], 1)
                denominator = torch.cat([denominators[f"{name}.weight"], denominators[f"{name}.bias"][:, None]], 1)
                p_out = projection_matrix(0, name, "out", 4, dw.shape[0], torch.float64)
                p_in = projection_matrix(0, name, "in", 4, dw.shape[1], torch.float64)
                blocks.append((p_out @ (dw / denominator) @ p_in.T).flatten())
            rows[index] += lr * torch.cat(blocks)
    return rows


def test_adam_normalised_rows_equal_an_autograd_replay_of_adam(tmp_path):
    """Moving weights (Adam, 2 epochs): each row is Σ_t η P(∇L_m(θ_t) ⊘ (sqrt(v̂_t) + ε)), v̂ of the very step."""
    snapshots = Snapshots()
    _fit_index(tmp_path, IndexedLM(lr=0.05, optimizer="adam"), DataLoader(IndexedChunks(), batch_size=5, shuffle=True),
               task=INDEXED, normalisation="adam", curvature=False, callbacks=[snapshots])
    rows, ids, curvature, metadata = _stored(tmp_path / "fit")
    expected = _adam_reference(snapshots, 0.05, (0.8, 0.9), 1e-3, len(Chunks()))
    assert ids.tolist() == list(range(len(Chunks()))) and curvature == {}
    torch.testing.assert_close(rows, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert metadata["collection"]["normalisation"] == "adam"


def test_adam_normalisation_is_refused_where_it_would_not_be_exact(tmp_path):
    with pytest.raises(ConfigError, match="curvature: false"):
        GradientIndexCallback(normalisation="adam")
    loader = DataLoader(IndexedChunks(), batch_size=5)
    with pytest.raises(ConfigError, match="hidden is trained by SGD, not torch.optim.Adam"):
        _fit_index(tmp_path, IndexedLM(lr=0.1), loader, task=INDEXED, normalisation="adam", curvature=False)
    callback = GradientIndexCallback(target_modules=LAYERS, normalisation="adam", curvature=False, task=INDEXED,
                                     output_dir=str(tmp_path / "accumulated"))
    with pytest.raises(ConfigError, match="accumulate_grad_batches: 1"):
        _trainer(tmp_path, [callback], max_epochs=1, accumulate_grad_batches=2).fit(
            IndexedLM(lr=0.1, optimizer="adam"), loader)
    with pytest.raises(ConfigError, match="a predict pass does not have"):
        _build(tmp_path, TupleLM(), name="predicted", normalisation="adam", curvature=False)


# ----------------------------------------------------------------------- kill and resume
class KillAtPredictBatch(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            raise KilledRun(f"killed at predict batch {batch_idx}")


def test_a_killed_predict_build_resumes_from_its_parts(tmp_path, monkeypatch):
    """Two of three batches in parts when killed; the resumed build computes the third only and is merged through
    a memory-mapped sum (as shards over 2 GiB are), the uninterrupted one in memory: the same index."""
    module = TupleLM()
    _build(tmp_path, module, name="whole", projection_dim=4)
    with pytest.raises(KilledRun):
        callback = GradientIndexCallback(target_modules=LAYERS, loss_fn=summed_loss, output_dir=str(tmp_path / "index"),
                                         dtype="float64", storage_dtype="float64", projection_dim=4, part_rows=5)
        _trainer(tmp_path, [callback, KillAtPredictBatch(2)]).predict(module, DataLoader(Chunks(), batch_size=5),
                                                                       return_predictions=False)
    assert not (tmp_path / "index" / "index.json").exists() and len(list((tmp_path / "index").glob("part-*"))) == 2
    moved = TupleLM()
    with torch.no_grad():
        moved.head.weight.add_(0.01)
    with pytest.raises(ArtifactError, match="built from other weights"):
        _build(tmp_path, moved, projection_dim=4, part_rows=5, resume=True)
    monkeypatch.setattr("lit_attrib.artifacts.index._IN_MEMORY_BYTES", 0)
    computed = []
    handle = module.hidden.register_forward_hook(lambda m, inputs, output: computed.append(inputs[0].shape[0]))
    _build(tmp_path, module, projection_dim=4, part_rows=5, resume=True)
    handle.remove()
    assert sum(computed) == len(Chunks()) - 10  # the two finished batches are not computed again
    (rows, ids, curvature, _), (whole, whole_ids, whole_curvature, _) = _stored(tmp_path / "index"), \
        _stored(tmp_path / "whole")
    assert ids.tolist() == whole_ids.tolist() == list(range(len(Chunks())))
    torch.testing.assert_close(rows, whole, rtol=1e-12, atol=0)
    for key, value in _covariances(whole_curvature).items():
        torch.testing.assert_close(_covariances(curvature)[key], value, rtol=1e-10, atol=1e-14)
    assert not list((tmp_path / "index").glob("part-*")) and not (tmp_path / "index" / "progress.json").exists()


def test_a_predict_builds_parts_hold_stored_values_and_merge_to_the_shard_written_from_memory(tmp_path):
    """A one-process build that fits in memory writes its float16 shard directly; one killed after two parts (cast
    to float16 already: a predict build never sums rows) and resumed merges them to the same bytes."""
    module = TupleLM()
    _build(tmp_path, module, name="direct", projection_dim=4, storage_dtype="float16")
    with pytest.raises(KilledRun):
        callback = GradientIndexCallback(target_modules=LAYERS, loss_fn=summed_loss, output_dir=str(tmp_path / "parts"),
                                         dtype="float64", storage_dtype="float16", projection_dim=4, part_rows=5)
        _trainer(tmp_path, [callback, KillAtPredictBatch(2)]).predict(module, DataLoader(Chunks(), batch_size=5),
                                                                       return_predictions=False)
    parts = sorted((tmp_path / "parts").glob("part-*"))
    assert [load_file(str(part))["rows"].dtype for part in parts] == [torch.float16, torch.float16]
    _build(tmp_path, module, name="parts", projection_dim=4, storage_dtype="float16", part_rows=5, resume=True)
    (rows, ids, curvature, _), (direct, direct_ids, direct_curvature, _) = _stored(tmp_path / "parts"), \
        _stored(tmp_path / "direct")
    assert rows.dtype == torch.float16 and torch.equal(rows, direct) and ids.tolist() == direct_ids.tolist()
    for key, value in _covariances(direct_curvature).items():
        torch.testing.assert_close(_covariances(curvature)[key], value, rtol=1e-10, atol=1e-14)


def test_a_killed_fit_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    """Moving weights (SGD); the killed run wrote parts after the checkpoint it resumes from: they are dropped."""

    def fit(name, kill=None, ckpt_path=None):
        callback = GradientIndexCallback(target_modules=LAYERS, stages=["fit"], task=INDEXED, dtype="float64",
                                         storage_dtype="float64", projection_dim=4, part_rows=5,
                                         output_dir=str(tmp_path / name))
        checkpoints = ModelCheckpoint(dirpath=tmp_path / f"{name}-ck", every_n_train_steps=1, save_top_k=-1)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, max_epochs=2,
                          callbacks=[callback, checkpoints] + ([KillAtStep(kill)] if kill is not None else []))
        trainer.fit(IndexedLM(lr=0.2), DataLoader(IndexedChunks(), batch_size=5), ckpt_path=ckpt_path)

    fit("whole")
    with pytest.raises(KilledRun):
        fit("resumed", kill=5)
    assert len(list((tmp_path / "resumed").glob("part-*"))) == 5  # up to step 4; the checkpoint below had 3
    # The end of epoch 0: Lightning restarts a plain loader from its first batch when it resumes mid-epoch, so
    # training itself would differ from the uninterrupted run there (the index follows it: rows keyed by ids).
    fit("resumed", ckpt_path=tmp_path / "resumed-ck" / "epoch=0-step=3.ckpt")
    (rows, ids, curvature, metadata), (whole, whole_ids, whole_curvature, _) = _stored(tmp_path / "resumed"), \
        _stored(tmp_path / "whole")
    assert ids.tolist() == whole_ids.tolist() == list(range(len(Chunks())))
    torch.testing.assert_close(rows, whole, rtol=1e-10, atol=1e-14)
    for key, value in _covariances(whole_curvature).items():
        torch.testing.assert_close(_covariances(curvature)[key], value, rtol=1e-9, atol=1e-14)
    assert metadata["collection"]["steps"] == 6 and metadata["collection"]["rows_added"] == 2 * len(Chunks())


# ---------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = """
import sys

from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lit_attrib.callbacks import GradientIndexCallback
from test_gradient_index import INDEXED, LAYERS, FreezeWeights, IndexedChunks, IndexedLM

if __name__ == "__main__":
    callback = GradientIndexCallback(target_modules=LAYERS, stages=["fit"], task=INDEXED, dtype="float64",
                                     storage_dtype="float64", projection_dim=4, part_rows=3, output_dir=sys.argv[1])
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=sys.argv[2], callbacks=[callback, FreezeWeights()])
    trainer.fit(IndexedLM(lr=0.5), DataLoader(IndexedChunks(16), batch_size=4, shuffle=True))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_fit_equals_a_one_process_predict_pass(tmp_path):
    """2 CPU processes (gloo), shuffled, frozen weights, lr 0.5 over 2 epochs: every row is 1 × its predict row;
    one shard per process, the ids of process 0 before those of process 1."""
    script = tmp_path / "ddp_index.py"
    script.write_text(_DDP_SCRIPT)
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp"), str(tmp_path)], check=False,
                            capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    callback = GradientIndexCallback(target_modules=LAYERS, task=INDEXED, dtype="float64", storage_dtype="float64",
                                     projection_dim=4, output_dir=str(tmp_path / "predicted"))
    _trainer(tmp_path, [callback]).predict(IndexedLM(), DataLoader(IndexedChunks(16), batch_size=5),
                                           return_predictions=False)
    (rows, ids, curvature, metadata), (expected, expected_ids, expected_curvature, _) = \
        _stored(tmp_path / "ddp"), _stored(tmp_path / "predicted")
    assert metadata["shards"] == [[f"{kind}-rank00{r}.npy" for kind in ("rows", "ids", "norms")] for r in range(2)]
    assert [np.load(tmp_path / "ddp" / f"ids-rank00{r}.npy").tolist() for r in range(2)] == [list(range(8)),
                                                                                           list(range(8, 16))]
    assert ids.tolist() == expected_ids.tolist() == list(range(16))
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-12)
    for key, value in _covariances(expected_curvature).items():
        torch.testing.assert_close(_covariances(curvature)[key], value, rtol=1e-9, atol=1e-12)
    assert metadata["collection"]["rows_added"] == 32 and metadata["collection"]["steps"] == 4
