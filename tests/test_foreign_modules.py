"""lit_attrib dropped into four users' own Lightning projects (``foreign_modules.py``): every number its
callbacks write is checked against the plain-torch references of ``foreign_references.py``.

Modules: Lightning's demo transformer (tuple batches), a nanoGPT-style GPT (tuple batches, shifted
targets with -1), an HF Llama in a user's module with ``labels`` and the same without ``labels``. The
two tuple-batch modules get their glue as a :class:`lit_attrib.engine.Task`; the Llama modules get
none (lit_attrib detects the wrapped HF model and the HF-style dict batches).

Runs in float64 (one thread); numbers are compared with ``rtol`` relative to the largest reference
entry: 1e-9 for the demo and nanoGPT, 2e-5 for the Llama modules, whose ``LlamaRMSNorm`` (and HF's own
``labels`` loss) computes in float32 even in a float64 model (see :func:`tol`).

What lit_attrib is not given: the training loss's reduction is stated (``token_mean``) or found and
checked (``auto``); rows carry example ids only where a test says so (shuffled loaders without them
must be refused); the modules define no ``predict_step``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from foreign_modules import FOREIGN, Foreign, foreign_task, perturbed
from foreign_references import (
    inverse_hvp,
    per_example_gradients,
    read_factors,
    reference_attention,
    reference_influence,
    reference_kfac,
    reference_kfac_training,
    reference_lambda,
    reference_token_scores,
    reference_tracin,
    sgd_step,
)
from lightning.pytorch import Callback, Trainer
from lightning_utilities.core.apply_func import apply_to_collection
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lit_attrib.callbacks import (
    AttentionCaptureCallback,
    InfluenceCallback,
    KFACCollectorCallback,
    SketchedGradCallback,
    TokenInfluenceCallback,
)
from lit_attrib.errors import LitAttribError

NAMES = list(FOREIGN)
LLAMAS = ["llama_labels", "llama_nolabels"]
N_TRAIN, N_QUERY = 8, 3
LR = 0.1


# ====================================================================================== helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny float64 matrices: one thread is faster than two, and spins less on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, max_epochs=1,
                   num_sanity_val_steps=0, **kwargs)


def predict(tmp_path: Path, module, loader, *callbacks) -> None:
    _trainer(tmp_path, list(callbacks)).predict(module, dataloaders=loader, return_predictions=False)


def fit(tmp_path: Path, module, loader, *callbacks) -> None:
    _trainer(tmp_path, list(callbacks)).fit(module, train_dataloaders=loader)


def glue(spec: Foreign) -> dict:
    """The arguments a user passes: the task for tuple batches, nothing for the Llama modules."""
    return {} if spec.hf else {"task": foreign_task(spec)}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """``actual == expected`` up to ``rtol`` of the largest entry of ``expected`` (float64 references)."""
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    assert scale > 0, f"{what}: the reference is all zeros (a useless check)"
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def tol(spec: Foreign) -> float:
    """HF's Llama is not float64 throughout: ``LlamaRMSNorm`` normalises in float32 (and HF's own loss with
    ``labels`` is float32), so two float64 computations that differ only in rounding before a norm agree to
    float32 precision behind it. The other modules are float64 end to end."""
    return 2e-5 if spec.hf else 1e-9


def split(batch) -> list:
    """A batch as batches of one example (right padding kept; it changes no example's loss)."""
    if isinstance(batch, dict):
        size = batch["input_ids"].shape[0]
        return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(size)]
    return [tuple(v[i:i + 1] for v in batch) for i in range(batch[0].shape[0])]


class Recorder(Callback):
    """The training batches in the order ``fit`` saw them (for replaying the run in the reference)."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # on the CPU, where the references run
        self.batches.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach().cpu().clone()))


def training_loss(module, batch, position):
    return module.training_step(batch, position)


# ====================================================================================== the world
class World:
    """One foreign module's data, per-example gradients and EKFAC factors (the reference's own,
    saved in lit_attrib's factors layout so the scoring callbacks do not depend on the collector)."""

    def __init__(self, spec: Foreign, folder: Path) -> None:
        self.spec = spec
        self.module = spec.make()
        self.train = spec.dataset(N_TRAIN, seed=1)
        self.train_ids = spec.dataset(N_TRAIN, seed=1, with_ids=True)
        self.queries = spec.dataset(N_QUERY, seed=2)
        self.forget = spec.dataset(3, seed=3)
        self.retain = spec.dataset(4, seed=4)
        grads = lambda data: per_example_gradients(self.module, spec.examples(data), spec.loss_fn, spec.layers)
        self.train_grads, self.query_grads = grads(self.train), grads(self.queries)
        self.forget_grads, self.retain_grads = grads(self.forget), grads(self.retain)
        self.factors_dir = folder / "factors"
        self.factors = self._save_factors(self.factors_dir)

    def _save_factors(self, folder: Path) -> dict:
        from lit_attrib.artifacts.factors import save_factors

        spec = self.spec
        covariances = reference_kfac(self.module, list(spec.loader(self.train)), spec.layers, spec.loss_fn,
                                     spec.padding_mask)
        modules, eigen = {}, {}
        for name, cov in covariances.items():
            mu, q_a = torch.linalg.eigh(cov["A"])
            lam, q_g = torch.linalg.eigh(cov["G"])
            eigen[name] = (q_a, q_g)
            modules[name] = {"activation_covariance": cov["A"], "gradient_covariance": cov["G"],
                             "activation_eigenvalues": mu, "activation_eigenvectors": q_a,
                             "gradient_eigenvalues": lam, "gradient_eigenvectors": q_g}
        lambdas = reference_lambda(self.module, spec.examples(self.train), spec.layers, spec.loss_fn, eigen)
        for name, factors in modules.items():
            factors["lambda"] = lambdas[name]
        described = {}
        for name in spec.layers:
            layer = self.module.get_submodule(name)
            described[name] = {"kind": "linear", "in_features": layer.in_features, "out_features": layer.out_features,
                               "bias": layer.bias is not None}
        save_factors(folder, modules, {"name": "factors", "arguments": {"strategy": "ekfac", "target_modules": spec.layers},
                                       "stage": "predict", "world_size": 1, "global_step": 0, "modules": described})
        return read_factors(folder)


@pytest.fixture(scope="module", params=NAMES)
def world(request, tmp_path_factory) -> World:
    return _world_of(request.param, tmp_path_factory)


def _world_of(name: str, tmp_path_factory, cache: dict = {}) -> World:  # noqa: B006 - a per-session cache
    if name not in cache:
        cache[name] = World(FOREIGN[name], tmp_path_factory.mktemp(name))
    return cache[name]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return lambda name: _world_of(name, tmp_path_factory)


# ============================================================================ K-FAC / EKFAC
def check_factors(folder: Path, expected: dict, strategy: str, spec: Foreign, module, examples, rtol: float) -> None:
    saved = read_factors(folder)
    assert sorted(saved) == sorted(spec.layers), f"tracked layers: {sorted(saved)}"
    for name in spec.layers:
        f = saved[name]
        assert_close_scaled(f["activation_covariance"], expected[name]["A"], rtol, f"{name} A")
        assert_close_scaled(f["gradient_covariance"], expected[name]["G"], rtol, f"{name} G")
        # the saved eigenbases diagonalise the reference A and G with the saved eigenvalues
        for key, matrix in (("activation", expected[name]["A"]), ("gradient", expected[name]["G"])):
            q, values = f[f"{key}_eigenvectors"].double(), f[f"{key}_eigenvalues"].double()
            assert_close_scaled(q @ torch.diag(values) @ q.T, matrix, rtol, f"{name} {key} eigendecomposition")
        if strategy == "kfac":
            assert_close_scaled(f["lambda"], torch.outer(f["gradient_eigenvalues"], f["activation_eigenvalues"]), rtol,
                  f"{name} K-FAC lambda")
    if strategy == "ekfac":
        eigen = {n: (saved[n]["activation_eigenvectors"].double(), saved[n]["gradient_eigenvectors"].double())
                 for n in spec.layers}
        lambdas = reference_lambda(module, examples, spec.layers, spec.loss_fn, eigen)
        for name in spec.layers:
            assert_close_scaled(saved[name]["lambda"], lambdas[name], rtol, f"{name} EKFAC lambda")


@pytest.mark.parametrize("name", NAMES)
def test_kfac_in_fit_observes_the_real_training_backward(tmp_path, name):
    """K-FAC collected in ``fit`` (lr > 0, so the weights move between batches) equals a replay of the same
    batches: each batch's sums at its step's weights, then the SGD step."""
    spec = FOREIGN[name]
    data = spec.dataset(N_TRAIN, seed=1)
    recorder = Recorder()
    callback = KFACCollectorCallback(target_modules=spec.patterns, strategy="kfac", dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "factors"), train_loss_reduction="token_mean",
                                     **glue(spec))
    trained = spec.make(lr=LR)
    fit(tmp_path, trained, spec.loader(data, batch_size=4), recorder, callback)
    assert len(recorder.batches) == 2
    replay = spec.make(lr=LR)
    expected = reference_kfac_training(replay, recorder.batches, spec.layers, spec.loss_fn, spec.padding_mask,
                                       training_loss, LR)
    for (key, value), other in zip(trained.state_dict().items(), replay.state_dict().values()):
        assert_close_scaled(value, other, tol(spec), f"the replay's weights {key}")
    check_factors(tmp_path / "factors", expected, "kfac", spec, replay, [], tol(spec))


@pytest.mark.parametrize("name", NAMES)
def test_kfac_in_fit_finds_or_refuses_the_reduction(tmp_path, name):
    """``train_loss_reduction="auto"`` on a module that says nothing: the factors are right or the run stops with
    a clear error, never a wrong number; a stated reduction that is not the training step's stops the run."""
    spec = FOREIGN[name]
    data = spec.dataset(N_TRAIN, seed=1)
    wrong = KFACCollectorCallback(target_modules=spec.patterns, strategy="kfac", dtype="float64", plots=False,
                                  output_dir=str(tmp_path / "wrong"), train_loss_reduction="example_mean",
                                  **glue(spec))
    with pytest.raises(LitAttribError, match="train_loss_reduction"):
        fit(tmp_path, spec.make(lr=LR), spec.loader(data, batch_size=4), wrong)
    auto = KFACCollectorCallback(target_modules=spec.patterns, strategy="kfac", dtype="float64", plots=False,
                                 output_dir=str(tmp_path / "auto"), train_loss_reduction="auto", **glue(spec))
    recorder = Recorder()
    try:
        fit(tmp_path, spec.make(lr=LR), spec.loader(data, batch_size=4), recorder, auto)
    except LitAttribError as error:
        assert "reduc" in str(error), str(error)
        return
    expected = reference_kfac_training(spec.make(lr=LR), recorder.batches, spec.layers, spec.loss_fn,
                                       spec.padding_mask, training_loss, LR)
    check_factors(tmp_path / "auto", expected, "kfac", spec, None, [], tol(spec))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_in_predict(tmp_path, world, strategy):
    spec = world.spec
    callback = KFACCollectorCallback(target_modules=spec.patterns, strategy=strategy, dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "factors"), **glue(spec))
    predict(tmp_path, spec.make(), spec.loader(world.train, batch_size=7), callback)
    expected = reference_kfac(world.module, list(spec.loader(world.train, batch_size=7)), spec.layers, spec.loss_fn,
                              spec.padding_mask)
    check_factors(tmp_path / "factors", expected, strategy, spec, world.module, spec.examples(world.train), tol(spec))
    metadata = json.loads((tmp_path / "factors" / "factors.json").read_text())
    assert metadata["arguments"]["strategy"] == strategy


def test_kfac_does_not_depend_on_batching_or_shuffling(tmp_path, world):
    spec = world.spec
    folders = {}
    for label, loader in {"bs7": spec.loader(world.train, batch_size=7),
                          "bs1-shuffled": spec.loader(world.train, batch_size=1, shuffle=True),
                          "bs7-shuffled-ids": spec.loader(world.train_ids, batch_size=7, shuffle=True)}.items():
        folders[label] = tmp_path / label
        predict(tmp_path, spec.make(), loader, KFACCollectorCallback(
            target_modules=spec.patterns, strategy="ekfac", dtype="float64", plots=False, output_dir=str(folders[label]),
            **glue(spec)))
    first = read_factors(folders["bs7"])
    for label in ("bs1-shuffled", "bs7-shuffled-ids"):
        other = read_factors(folders[label])
        for name in spec.layers:
            for key in ("activation_covariance", "gradient_covariance", "lambda"):
                assert_close_scaled(other[name][key], first[name][key], tol(spec), f"{label}: {name}.{key}")


def test_kfac_with_explicit_glue_on_hf_modules(tmp_path, worlds):
    """The Llama modules with the glue a user might pass anyway give the detected task's factors."""
    for name in LLAMAS:
        world = worlds(name)
        spec = world.spec
        callback = KFACCollectorCallback(target_modules=spec.patterns, strategy="kfac", dtype="float64", plots=False,
                                         output_dir=str(tmp_path / name), task=foreign_task(spec))
        predict(tmp_path, spec.make(), spec.loader(world.train), callback)
        expected = reference_kfac(world.module, list(spec.loader(world.train)), spec.layers, spec.loss_fn,
                                  spec.padding_mask)
        check_factors(tmp_path / name, expected, "kfac", spec, world.module, [], tol(spec))


def test_a_layer_never_called_through_forward_is_refused(tmp_path):
    """The demo's ``nn.MultiheadAttention.out_proj``: its weights are read by the attention function, its
    ``forward`` never runs, so hooks see nothing. Collecting it must stop with an error naming it."""
    spec = FOREIGN["demo"]
    callback = KFACCollectorCallback(target_modules=["model.transformer.encoder.layers.0.self_attn.out_proj"],
                                     strategy="kfac", dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "factors"), **glue(spec))
    with pytest.raises(LitAttribError, match="out_proj"):
        predict(tmp_path, spec.make(), spec.loader(spec.dataset(4, seed=1)), callback)
    assert not (tmp_path / "factors" / "factors.safetensors").exists()


# =================================================================================== influence
def influence(tmp_path, world, loader, queries=None, name="influence", **kwargs):
    spec = world.spec
    callback = InfluenceCallback(factors=str(world.factors_dir), dtype="float64", output_dir=str(tmp_path / name),
                                 queries=spec.loader(world.queries) if queries is None else queries,
                                 **{**glue(spec), **kwargs})
    predict(tmp_path, spec.make(), loader, callback)
    return load_file(str(tmp_path / name / "scores.safetensors"))


def test_influence(tmp_path, world):
    spec = world.spec
    scores = influence(tmp_path, world, spec.loader(world.train, batch_size=7))
    expected = reference_influence(world.query_grads, world.train_grads, world.factors)
    assert scores["scores"].shape == (N_QUERY, N_TRAIN)
    assert_close_scaled(scores["scores"], expected, tol(spec), "influence scores")
    assert scores["train_indices"].tolist() == list(range(N_TRAIN))
    assert scores["query_indices"].tolist() == list(range(N_QUERY))


def test_influence_with_explicit_damping_and_queries_as_a_dataset(tmp_path, world):
    spec = world.spec
    if spec.hf:
        pytest.skip("rows of different lengths need the user's collate_fn: a bare dataset cannot be batched")
    scores = influence(tmp_path, world, spec.loader(world.train), queries=world.queries, damping=0.05)
    assert_close_scaled(scores["scores"], reference_influence(world.query_grads, world.train_grads, world.factors, damping=0.05),
          tol(spec), "influence scores (damping 0.05)")


def test_influence_does_not_depend_on_batching_or_shuffling(tmp_path, world):
    spec = world.spec
    expected = reference_influence(world.query_grads, world.train_grads, world.factors)
    shuffled = influence(tmp_path, world, spec.loader(world.train_ids, batch_size=1, shuffle=True), name="bs1",
                         queries=spec.loader(world.queries, batch_size=2))
    assert_close_scaled(shuffled["scores"], expected, tol(spec), "shuffled, batch size 1, with ids")
    assert shuffled["train_indices"].tolist() == list(range(N_TRAIN))


# ============================================================================ token influence
def token_influence(tmp_path, world, loader, name="tokens", **kwargs):
    spec = world.spec
    callback = TokenInfluenceCallback(factors=str(world.factors_dir), dtype="float64", output_dir=str(tmp_path / name),
                                      positive=spec.loader(world.forget), negative=spec.loader(world.retain),
                                      **{**glue(spec), **kwargs})
    predict(tmp_path, spec.make(), loader, callback)
    return load_file(str(tmp_path / name / "token_scores.safetensors"))


def expected_token_scores(world) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N_query, T_max)`` reference scores and the mask of the tokens that carry a loss."""
    spec = world.spec
    direction = {}
    for name in spec.layers:
        d = world.forget_grads[name].mean(0) - world.retain_grads[name].mean(0)
        direction[name] = inverse_hvp(world.factors[name], d, None)
    examples = spec.examples(world.queries)
    rows = reference_token_scores(world.module, examples, spec.token_loss_fn, direction, spec.layers)
    width = max(len(r) for r in rows)
    scores = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, example) in enumerate(zip(rows, examples)):
        scores[i, :len(row)] = row
        mask[i, :len(row)] = spec.token_mask(example)[0]
    return scores, mask


def test_token_influence(tmp_path, world):
    spec = world.spec
    tensors = token_influence(tmp_path, world, spec.loader(world.queries, batch_size=2))
    scores, mask = expected_token_scores(world)
    assert tensors["scores"].shape == scores.shape
    assert_close_scaled(tensors["scores"], scores, tol(spec), "token scores")
    assert torch.equal(tensors["mask"].bool(), mask), f"mask {tensors['mask'].int().tolist()} != {mask.int().tolist()}"
    assert tensors["query_indices"].tolist() == list(range(N_QUERY))


def test_token_influence_does_not_depend_on_batching_or_shuffling(tmp_path, world):
    spec = world.spec
    queries = spec.dataset(N_QUERY, seed=2, with_ids=True)
    tensors = token_influence(tmp_path, world, spec.loader(queries, batch_size=1, shuffle=True, seed=3))
    scores, mask = expected_token_scores(world)
    assert_close_scaled(tensors["scores"], scores, tol(spec), "token scores, shuffled, batch size 1")
    assert torch.equal(tensors["mask"].bool(), mask)
    assert tensors["query_indices"].tolist() == list(range(N_QUERY))


# ===================================================================================== SDI
def save_checkpoint(state: dict, path: Path, lr: float, step: int) -> str:
    torch.save({"state_dict": state, "global_step": step, "epoch": 0,
                "optimizer_states": [{"param_groups": [{"lr": lr}]}]}, path)
    return str(path)


@pytest.fixture
def checkpoints(tmp_path, world):
    module = world.spec.make()
    first = save_checkpoint(module.state_dict(), tmp_path / "a.ckpt", 0.5, 10)
    second = save_checkpoint(perturbed(module), tmp_path / "b.ckpt", 0.25, 20)
    return [first, second]


def reference_checkpoint_tracin(world, paths, etas) -> torch.Tensor:
    spec = world.spec
    queries, train = [], []
    for path in paths:
        module = spec.make()
        module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        queries.append(per_example_gradients(module, spec.examples(world.queries), spec.loss_fn, spec.layers))
        train.append(per_example_gradients(module, spec.examples(world.train), spec.loss_fn, spec.layers))
    return reference_tracin(queries, train, etas)


def sdi(tmp_path, world, name="sdi", fn="predict", loader=None, queries=None, module=None, **kwargs):
    spec = world.spec
    callback = SketchedGradCallback(target_modules=spec.patterns, exact=True, dtype="float64", plots=False,
                                    output_dir=str(tmp_path / name),
                                    queries=spec.loader(world.queries) if queries is None else queries,
                                    **{**glue(spec), **kwargs})
    module = module or spec.make(lr=LR)
    (predict if fn == "predict" else fit)(tmp_path, module, loader, callback)
    return load_file(str(tmp_path / name / "sdi.safetensors"))


@pytest.mark.parametrize("source", ["predict_loader", "train_data"])
def test_sdi_checkpoint_mode(tmp_path, world, checkpoints, source):
    """TracInCP in ``trainer.predict(module, dataloaders=loader)``: the training examples are the predict
    loader's (``predict_loader``), or the same loader handed over as ``train_data``."""
    spec = world.spec
    loader = spec.loader(world.train, batch_size=7)
    extra = {"train_data": loader} if source == "train_data" else {}
    tensors = sdi(tmp_path, world, loader=loader, checkpoints=checkpoints, **extra)
    expected = reference_checkpoint_tracin(world, checkpoints, [0.5, 0.25])  # the checkpoints' learning rates
    assert tensors["tracin"].shape == (N_TRAIN, N_QUERY)
    assert_close_scaled(tensors["tracin"], expected, tol(spec), "TracInCP")
    assert_close_scaled(tensors["sdi"].sum(-1), expected, tol(spec), "SDI summed over steps")
    assert tensors["train_indices"].tolist() == list(range(N_TRAIN))
    assert tensors["query_indices"].tolist() == list(range(N_QUERY))


def test_sdi_checkpoint_mode_does_not_depend_on_batching_or_shuffling(tmp_path, world, checkpoints):
    spec = world.spec
    loader = spec.loader(world.train_ids, batch_size=1, shuffle=True)
    tensors = sdi(tmp_path, world, loader=loader, train_data=loader, checkpoints=checkpoints, eta=[1.0, 2.0])
    assert_close_scaled(tensors["tracin"], reference_checkpoint_tracin(world, checkpoints, [1.0, 2.0]), tol(spec),
          "TracInCP, shuffled, batch size 1")
    assert tensors["train_indices"].tolist() == list(range(N_TRAIN))


def reference_online_tracin(world, batches, lr) -> torch.Tensor:
    """TracIn-ideal along a replay of the recorded training batches: before each SGD step, ``lr`` times
    each example's gradient dotted with each query's, at that step's weights."""
    spec = world.spec
    module = spec.make(lr=lr)
    total = torch.zeros(N_TRAIN, N_QUERY, dtype=torch.float64)
    seen = 0
    for position, batch in enumerate(batches):
        queries = per_example_gradients(module, spec.examples(world.queries), spec.loss_fn, spec.layers)
        train = per_example_gradients(module, split(batch), spec.loss_fn, spec.layers)
        ids = spec.example_ids(batch)
        ids = list(range(seen, seen + len(split(batch)))) if ids is None else ids.tolist()
        seen += len(ids)
        total[ids] += reference_tracin([queries], [train], [lr])
        sgd_step(module, training_loss(module, batch, position), lr)
    return total


@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "shuffled-ids"])
def test_sdi_online_in_fit(tmp_path, world, shuffled):
    spec = world.spec
    if shuffled and spec.name == "demo":
        pytest.skip("the demo's training_step unpacks (inputs, target): its batches cannot carry ids")
    data = world.train_ids if shuffled else world.train
    recorder = Recorder()
    callback = SketchedGradCallback(target_modules=spec.patterns, exact=True, dtype="float64", plots=False,
                                    output_dir=str(tmp_path / "sdi"), queries=spec.loader(world.queries),
                                    train_loss_reduction="token_mean", **glue(spec))
    fit(tmp_path, spec.make(lr=LR), spec.loader(data, batch_size=4, shuffle=shuffled), recorder, callback)
    tensors = load_file(str(tmp_path / "sdi" / "sdi.safetensors"))
    expected = reference_online_tracin(world, recorder.batches, LR)
    assert_close_scaled(tensors["tracin"], expected, tol(spec), "online TracIn")
    assert tensors["train_indices"].tolist() == list(range(N_TRAIN))


def test_sdi_tracks_a_tied_weight_once(tmp_path, worlds):
    """nanoGPT's ``lm_head`` and ``wte`` share one weight: its per-example gradient is the sum over both
    uses (the embedding's and the head's), and it is one parameter in the dot products."""
    world = worlds("nanogpt")
    spec = world.spec
    module = spec.make()
    path = save_checkpoint(module.state_dict(), tmp_path / "a.ckpt", 1.0, 0)
    callback = SketchedGradCallback(target_modules=["gpt.lm_head", "gpt.transformer.wte"], exact=True,
                                    dtype="float64", plots=False, output_dir=str(tmp_path / "sdi"),
                                    queries=spec.loader(world.queries), checkpoints=[path],
                                    train_data=spec.loader(world.train), **glue(spec))
    predict(tmp_path, spec.make(), spec.loader(world.train), callback)
    tensors = load_file(str(tmp_path / "sdi" / "sdi.safetensors"))

    def weight_grads(data):
        rows = []
        for example in spec.examples(data):
            loss = spec.loss_fn(module, example).sum()
            rows.append(torch.autograd.grad(loss, module.gpt.lm_head.weight)[0].flatten())
        return torch.stack(rows)

    assert module.gpt.lm_head.weight is module.gpt.transformer.wte.weight
    expected = weight_grads(world.train) @ weight_grads(world.queries).T
    assert_close_scaled(tensors["tracin"], expected, tol(spec), "TracIn of the tied weight")


# =============================================================================== attention
def with_predict_step(module):
    """The module with a ``predict_step`` of its own that runs the model on the batch (as many users write)."""

    class WithPredictStep(type(module)):
        def predict_step(self, batch, batch_idx):
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    module.__class__ = WithPredictStep
    return module


@pytest.mark.parametrize("name", LLAMAS)
@pytest.mark.parametrize("step", ["lent", "own"], ids=["no-predict-step", "own-predict-step"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "shuffled-ids"])
def test_attention_capture(tmp_path, worlds, name, step, shuffled):
    """The maps of every example (keyed by dataset index) equal softmax attention recomputed in float64 from
    ``q_proj``/``k_proj`` with RoPE; each query's row carries mass 1. ``no-predict-step``: the module has no
    ``predict_step`` (lit_attrib lends one); ``own-predict-step``: it runs the model itself."""
    world = worlds(name)
    spec = world.spec
    data = world.train_ids if shuffled else world.train
    callback = AttentionCaptureCallback(queries="all", max_examples=N_TRAIN, plot_examples=0,
                                        output_dir=str(tmp_path / "attention"))
    module = spec.make() if step == "lent" else with_predict_step(spec.make())
    predict(tmp_path, module, spec.loader(data, batch_size=1 if shuffled else 7, shuffle=shuffled), callback)
    tensors = load_file(str(tmp_path / "attention" / "attention.safetensors"))
    assert any(key.endswith("/layer0") for key in tensors), f"no maps captured: {sorted(tensors)[:8]}"
    total_queries = 0
    for index, example in enumerate(spec.examples(world.train)):
        maps = reference_attention(world.module.model, example)
        length = example["input_ids"].shape[1]
        total_queries += length
        for layer, expected in enumerate(maps):
            captured = tensors[f"{index}/layer{layer}"]  # (heads, queries, keys) over the real tokens
            assert captured.shape == expected.shape
            torch.testing.assert_close(captured.double(), expected, rtol=0, atol=2e-6)  # maps are stored in float32
        assert tensors[f"{index}/input_ids"].tolist() == example["input_ids"][0].tolist()
    # every query's row sums to 1 over the real keys, all of class "other"
    mass = tensors["mass"]  # (parts, layers, heads, classes)
    torch.testing.assert_close(mass[0, :, :, 0].double(), torch.full(mass.shape[1:3], float(total_queries),
                                                                     dtype=torch.float64), rtol=1e-5, atol=0)


# ================================================================= shuffled loaders without ids
REFUSALS = ["influence", "influence_queries", "token_influence", "sdi_checkpoints", "sdi_online", "attention"]


@pytest.mark.parametrize("callback", REFUSALS)
def test_shuffled_loader_without_ids_is_refused(tmp_path, world, callback):
    """Rows without example ids from a shuffled loader cannot be put in dataset order: a clear error, before any
    result is written."""
    spec = world.spec
    shuffled = spec.loader(world.train, batch_size=3, shuffle=True)
    if callback == "attention" and not spec.hf:
        pytest.skip("AttentionCaptureCallback is for Llama-family attention")
    with pytest.raises(LitAttribError, match="(?i)shuffl") as error:
        if callback == "influence":
            influence(tmp_path, world, shuffled)
        elif callback == "influence_queries":
            influence(tmp_path, world, spec.loader(world.train), queries=spec.loader(world.queries, shuffle=True))
        elif callback == "token_influence":
            token_influence(tmp_path, world, shuffled)
        elif callback == "sdi_checkpoints":
            path = save_checkpoint(spec.make().state_dict(), tmp_path / "a.ckpt", 1.0, 0)
            sdi(tmp_path, world, loader=shuffled, train_data=shuffled, checkpoints=[path])
        elif callback == "sdi_online":
            sdi(tmp_path, world, fn="fit", loader=shuffled, train_loss_reduction="token_mean")
        else:
            predict(tmp_path, with_predict_step(spec.make()), shuffled, AttentionCaptureCallback(
                queries="all", plot_examples=0, output_dir=str(tmp_path / "out")))
    assert "id" in str(error.value).lower(), str(error.value)
    results = ("scores.safetensors", "token_scores.safetensors", "sdi.safetensors", "attention.safetensors")
    written = [p.name for p in tmp_path.rglob("*") if p.name in results]
    assert not written, f"results written despite the error: {written}"


def test_unshuffled_loaders_without_ids_number_rows_in_order(tmp_path, worlds):
    """The data handed directly as a ``DataLoader`` needs no ids when it is not shuffled (checked above for every
    callback); as a bare dataset too."""
    world = worlds("nanogpt")
    spec = world.spec
    scores = influence(tmp_path, world, DataLoader(world.train, batch_size=4), queries=world.queries)
    assert_close_scaled(scores["scores"], reference_influence(world.query_grads, world.train_grads, world.factors), tol(spec),
          "influence from a plain DataLoader and a dataset of queries")


def test_predict_on_a_module_without_forward_or_predict_step(tmp_path, worlds):
    """A module with neither ``forward`` nor ``predict_step``: Lightning refuses ``predict`` before any
    callback runs (documented in docs/own_project.md); with a ``forward`` and no ``predict_step`` the
    callbacks lend one (the other tests)."""
    from foreign_modules import LlamaWithoutForward
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    world = worlds("llama_labels")
    spec = world.spec
    callback = KFACCollectorCallback(target_modules=spec.patterns, strategy="kfac", dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "factors"))
    with pytest.raises(MisconfigurationException, match="requires `forward`"):
        predict(tmp_path, LlamaWithoutForward(), spec.loader(world.train), callback)


def test_task_built_from_functions_whose_example_ids_say_none(tmp_path, worlds):
    """``Task(example_ids=f)`` where ``f(batch)`` returns ``None`` for batches without ids (the contract's
    ``example_ids(batch) -> (B,) | None``): rows are then numbered in loader order."""
    world = worlds("nanogpt")
    spec = world.spec
    callback = InfluenceCallback(factors=str(world.factors_dir), dtype="float64", output_dir=str(tmp_path / "out"),
                                 queries=spec.loader(world.queries), task=foreign_task(spec, style="functions"))
    predict(tmp_path, spec.make(), spec.loader(world.train), callback)
    scores = load_file(str(tmp_path / "out" / "scores.safetensors"))
    assert_close_scaled(scores["scores"], reference_influence(world.query_grads, world.train_grads, world.factors), tol(spec),
          "influence with a functions-built task")
