"""The gradient index: projected per-example gradients stored once, queried later. Exact at full size
against InfluenceCallback and autograd; unbiased at small size; damaged or foreign indexes refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_engine import Chunks, TupleLM, _trainer, summed_loss
from torch.utils.data import DataLoader, Subset

from lit_attrib.callbacks import GradientIndexCallback, InfluenceCallback, KFACCollectorCallback
from lit_attrib.engine import Task
from lit_attrib.errors import ArtifactError
from lit_attrib.index import GradientIndex

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
