"""Pairwise and token-wise influence against explicit references (autograd gradients, explicit inverses)."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from reference_models import KilledRun, RowsDataModule, TinyModule, make_rows
from safetensors.torch import load_file
from test_kfac import LAYERS, collect

from lit_attrib.callbacks import InfluenceCallback, TokenInfluenceCallback
from lit_attrib.errors import ArtifactError, DataError, ModelError
from lit_attrib.ops import token_nll

BIAS = {"net.inp": True, "net.shared": False, "net.conv": True, "net.head": False}


def _trainer(tmp_path, callbacks):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)


def influence(tmp_path, module, data, name="influence", **kwargs):
    callback = InfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / name),
                                 **{"dtype": "float64", **kwargs})
    _trainer(tmp_path, [callback]).predict(module, data, return_predictions=False)
    return load_file(str(tmp_path / name / "scores.safetensors")), callback


def token_influence(tmp_path, module, data, name="tokens", **kwargs):
    callback = TokenInfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / name),
                                      **{"dtype": "float64", **kwargs})
    _trainer(tmp_path, [callback]).predict(module, data, return_predictions=False)
    return load_file(str(tmp_path / name / "token_scores.safetensors")), callback


@pytest.fixture(scope="module")
def rows():
    return make_rows(count=20)


@pytest.fixture
def module():
    return TinyModule().double()


@pytest.fixture
def factors(tmp_path, module, rows):
    return collect(tmp_path, module, RowsDataModule(rows, batch_size=8), stage="predict")


# ------------------------------------------------------------------------------- references
def example_gradient(module: TinyModule, row: dict, token: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer gradient of one example's summed loss (or of one token's loss), bias-appended, by autograd."""
    nll = token_nll(module(torch.tensor([row["input_ids"]])), torch.tensor([row["labels"]]))[0]
    loss = nll.sum() if token is None else nll[token]
    out = {}
    for name in LAYERS:
        layer = module.get_submodule(name)
        params = [layer.weight] + ([layer.bias] if BIAS[name] else [])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        weight = grads[0].T if name == "net.conv" else grads[0]  # Conv1D stores (in, out)
        out[name] = torch.cat([weight, grads[1][:, None]], 1) if BIAS[name] else weight
    return out


def explicit_inverse(factors, name: str, damping: float | None = None) -> torch.Tensor:
    """``(H + λI)⁻¹`` of one layer as an explicit matrix over row-major ``vec(W)``, by ``torch.linalg.inv``."""
    q_a = factors[name]["activation_eigenvectors"]
    q_g = factors[name]["gradient_eigenvectors"]
    lam = factors[name]["lambda"]
    damping = 0.1 * float(lam.mean()) if damping is None else damping
    basis = torch.kron(q_g, q_a)  # columns: eigenvectors of G ⊗ A in row-major vec layout
    hessian = basis @ torch.diag(lam.flatten() + damping) @ basis.T
    return torch.linalg.inv(hessian)


def reference_scores(module, factors, queries, train, damping=None) -> torch.Tensor:
    inverses = {name: explicit_inverse(factors, name, damping) for name in LAYERS}
    query_grads = [example_gradient(module, row) for row in queries]
    train_grads = [example_gradient(module, row) for row in train]
    out = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for q, gq in enumerate(query_grads):
        for m, gm in enumerate(train_grads):
            out[q, m] = sum(gq[n].flatten() @ inverses[n] @ gm[n].flatten() for n in LAYERS)
    return out


# ------------------------------------------------------------------------------- pairwise
def test_pairwise_scores_equal_explicit_inverse_of_saved_factors(tmp_path, module, rows, factors):
    queries = rows[:4]
    scores, _ = influence(tmp_path, module, RowsDataModule(rows, batch_size=7, queries=queries), token_scores=True)
    expected = reference_scores(module, factors, queries, rows)
    torch.testing.assert_close(scores["scores"], expected, rtol=1e-8, atol=0)
    assert scores["train_indices"].tolist() == list(range(len(rows)))
    assert scores["query_indices"].tolist() == [0, 1, 2, 3]
    # Per-token shares sum to the sequence score; tokens without a loss add nothing.
    torch.testing.assert_close(scores["token_scores"].sum(-1), expected, rtol=1e-8, atol=0)
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    padded = torch.arange(scores["token_scores"].shape[-1])[None, :] >= lengths[:, None]
    assert scores["token_scores"][:, padded].abs().max() == 0
    # The training examples most like the query rank first: each query is its own top training example.
    assert scores["scores"].argmax(1).tolist() == [0, 1, 2, 3]


def test_explicit_damping_is_used(tmp_path, module, rows, factors):
    scores, _ = influence(tmp_path, module, RowsDataModule(rows, queries=rows[:2]), damping=0.5)
    torch.testing.assert_close(scores["scores"], reference_scores(module, factors, rows[:2], rows, damping=0.5),
                               rtol=1e-8, atol=0)


@pytest.mark.parametrize("expand", [0.0, 1.0], ids=["through-tokens", "expanded"])
def test_low_rank_query_gradients_equal_truncated_svd_reference(tmp_path, module, rows, factors, expand):
    rank = 2
    scores, callback = influence(tmp_path, module, RowsDataModule(rows, queries=rows[:3]), query_gradient_rank=rank,
                                 expand_low_rank_gb=expand)
    assert sorted(callback.expanded) == (sorted(LAYERS) if expand else [])  # in backward order
    inverses = {name: explicit_inverse(factors, name) for name in LAYERS}
    expected = torch.zeros(3, len(rows), dtype=torch.float64)
    for q in range(3):
        gq = example_gradient(module, rows[q])
        truncated = {}
        for name in LAYERS:
            shape = gq[name].shape
            p = (inverses[name] @ gq[name].flatten()).reshape(shape)
            u, s, vh = torch.linalg.svd(p)
            truncated[name] = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        for m, row in enumerate(rows):
            gm = example_gradient(module, row)
            expected[q, m] = sum((truncated[n] * gm[n]).sum() for n in LAYERS)
    torch.testing.assert_close(scores["scores"], expected, rtol=1e-8, atol=1e-12)


def test_scores_do_not_depend_on_shuffling_or_batch_size(tmp_path, module, rows, factors):
    queries = rows[:3]
    plain, _ = influence(tmp_path, module, RowsDataModule(rows, batch_size=7, queries=queries), name="plain")
    single, _ = influence(tmp_path, module, RowsDataModule(rows, batch_size=1, queries=queries), name="single")
    torch.manual_seed(5)
    shuffled, _ = influence(tmp_path, module, RowsDataModule(rows, batch_size=7, shuffle=True, queries=queries),
                            name="shuffled")
    for other in (single, shuffled):
        assert other["train_indices"].tolist() == plain["train_indices"].tolist()
        torch.testing.assert_close(other["scores"], plain["scores"], rtol=1e-10, atol=0)


def test_topk_lists_helpful_and_harmful_examples_with_text(tmp_path, module, rows, factors):
    scores, _ = influence(tmp_path, module, RowsDataModule(rows, queries=rows[:2]), top_k=3)
    top = [json.loads(line) for line in (tmp_path / "influence" / "topk.jsonl").read_text().splitlines()]
    assert [t["query_index"] for t in top] == [0, 1]
    for q, entry in enumerate(top):
        order = torch.argsort(scores["scores"][q], descending=True)
        assert [h["index"] for h in entry["helpful"]] == order[:3].tolist()
        assert [h["index"] for h in entry["harmful"]] == order.flip(0)[:3].tolist()
        assert entry["helpful"][0]["score"] == pytest.approx(float(scores["scores"][q].max()))
    metadata = json.loads((tmp_path / "influence" / "scores.json").read_text())
    assert metadata["num_train"] == len(rows) and "helpful" in metadata["sign"]


class KillAfterBatches(Callback):
    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.batches:
            raise KilledRun(f"killed after batch {batch_idx}")


def test_killed_pass_resumes_and_gives_the_same_scores(tmp_path, module, rows, factors):
    data = RowsDataModule(rows, batch_size=3, queries=rows[:3])
    expected, _ = influence(tmp_path, module, data, name="whole")
    callback = InfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "killed"),
                                 dtype="float64", chunk_size=3)
    with pytest.raises(KilledRun):
        _trainer(tmp_path, [callback, KillAfterBatches(4)]).predict(module, data, return_predictions=False)
    assert not (tmp_path / "killed" / "scores.json").exists()  # no half-written artifact
    assert len(list((tmp_path / "killed" / ".chunks-influence").glob("chunk-*.safetensors"))) == 4
    resumed, callback = influence(tmp_path, module, data, name="killed", chunk_size=3)
    assert json.loads((tmp_path / "killed" / "scores.json").read_text())["resumed_examples"] == 12
    torch.testing.assert_close(resumed["scores"], expected["scores"], rtol=1e-12, atol=0)
    assert not (tmp_path / "killed" / ".chunks-influence").exists()


def test_chunks_of_other_weights_are_not_resumed(tmp_path, module, rows, factors):
    data = RowsDataModule(rows, batch_size=4, queries=rows[:2])
    with pytest.raises(KilledRun):
        callback = InfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "i"), chunk_size=4,
                                     dtype="float64")
        _trainer(tmp_path, [callback, KillAfterBatches(2)]).predict(module, data, return_predictions=False)
    with torch.no_grad():
        module.net.inp.weight.mul_(1.5)
    scores, _ = influence(tmp_path, module, data, name="i", chunk_size=4)
    assert json.loads((tmp_path / "i" / "scores.json").read_text())["resumed_examples"] == 0
    torch.testing.assert_close(scores["scores"], reference_scores(module, factors, rows[:2], rows), rtol=1e-8, atol=0)


# ----------------------------------------------------------------------------- token-wise
def naive_token_scores(module, factors, direction_sets, rows) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Seed 000's loop: v = H⁻¹ d with the explicit inverse, then one autograd.grad per token."""
    inverses = {name: explicit_inverse(factors, name) for name in LAYERS}
    d = {name: 0 for name in LAYERS}
    for sign, examples in direction_sets:
        for row in examples:
            for name, g in example_gradient(module, row).items():
                d[name] = d[name] + sign * g / len(examples)
    v = {name: inverses[name] @ d[name].flatten() for name in LAYERS}
    width = max(len(r["input_ids"]) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        for t in range(len(row["input_ids"])):
            if t == 0 or row["labels"][t] == -100:
                continue
            grads = example_gradient(module, row, token=t)
            out[i, t] = sum(v[n] @ grads[n].flatten() for n in LAYERS)
    return out, v


def test_token_scores_equal_the_per_token_autograd_loop_and_sum_to_the_sequence_score(tmp_path, module, rows, factors):
    forget, retain = rows[:4], rows[4:]
    data = RowsDataModule(rows, batch_size=6, forget=forget, retain=retain)
    result, _ = token_influence(tmp_path, module, data)
    expected, v = naive_token_scores(module, factors, [(1.0, forget), (-1.0, retain)], rows)
    width = result["scores"].shape[1]
    torch.testing.assert_close(result["scores"], expected[:, :width], rtol=1e-6, atol=1e-12)
    mask = torch.zeros_like(expected, dtype=torch.bool)
    for i, row in enumerate(rows):
        mask[i, 1:len(row["labels"])] = torch.tensor(row["labels"][1:]) != -100
    assert torch.equal(result["mask"], mask[:, :width])
    # Σ_j S_ij = vᵀ ∇L_i: the sequence-level score along the same direction.
    sequence = torch.stack([sum(v[n] @ g.flatten() for n, g in example_gradient(module, row).items()) for row in rows])
    torch.testing.assert_close(result["scores"].sum(1), sequence, rtol=1e-8, atol=1e-12)
    html = (tmp_path / "tokens" / "token_scores.html").read_text()
    assert html.count('class="q"') == len(rows) and "title=" in html
    metadata = json.loads((tmp_path / "tokens" / "token_scores.json").read_text())
    assert metadata["top_tokens"][0]["score"] == pytest.approx(float(result["scores"].max()))


def test_token_scores_with_a_forget_set_alone(tmp_path, module, rows, factors):
    data = RowsDataModule(rows[:5], batch_size=4, forget=rows[:3])
    result, _ = token_influence(tmp_path, module, data, negative=None)
    expected, _ = naive_token_scores(module, factors, [(1.0, rows[:3])], rows[:5])
    torch.testing.assert_close(result["scores"], expected[:, : result["scores"].shape[1]], rtol=1e-6, atol=1e-12)


def test_token_scores_on_a_tiny_llama_equal_the_autograd_loop(tmp_path, tokenizer_path):
    from conftest import TINY_CONFIGS

    from lit_attrib.modules import CausalLMModule

    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path, init_seed=0)
    module.configure_model()
    module = module.double().eval()
    rows = make_rows(count=6, vocab=50, seed=3)
    layers = ["model.model.layers.1.mlp.down_proj", "model.model.layers.0.self_attn.q_proj"]
    collect(tmp_path, module, RowsDataModule(rows, batch_size=3), stage="predict", target_modules=layers)
    data = RowsDataModule(rows, batch_size=3, forget=rows[:2], retain=rows[2:])
    result, callback = token_influence(tmp_path, module, data)
    params = {name: module.get_submodule(name).weight for name in layers}
    assert not callback.direction and all(t.device.type == "cpu" for t in callback.tangents.values())  # released
    tangents = {name: callback.tangents[f"pl_module.{name}.weight"] for name in layers}
    for i, row in enumerate(rows):
        batch = {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]]),
                 "attention_mask": torch.ones(1, len(row["input_ids"]), dtype=torch.long)}
        nll = module.per_token_loss(batch)[0]
        for t in range(2, len(row["input_ids"])):
            grads = torch.autograd.grad(nll[t], list(params.values()), retain_graph=True)
            expected = sum((g * tangents[n]).sum() for g, n in zip(grads, layers))
            # RMSNorm computes in float32 even in a float64 model, which bounds the agreement.
            assert float(result["scores"][i, t]) == pytest.approx(float(expected), rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------- bad input
def test_missing_factors_say_how_to_make_them(tmp_path, module, rows):
    with pytest.raises(ArtifactError, match="no complete factors.*KFACCollectorCallback"):
        influence(tmp_path, module, RowsDataModule(rows, queries=rows[:2]))


def test_factors_of_other_modules_or_shapes_are_refused(tmp_path, module, rows):
    collect(tmp_path, module, RowsDataModule(rows), stage="predict", target_modules=["net.inp", "net.head"])
    with pytest.raises(ArtifactError, match=r"not fitted for \['net.shared'\]"):
        influence(tmp_path, module, RowsDataModule(rows, queries=rows[:2]), target_modules=["net.shared"])
    wider = TinyModule().double()
    wider.net.inp = torch.nn.Linear(5, 7).double()
    with pytest.raises(ArtifactError, match="'net.inp': out_features is 7 in the model but 5 in the factors"):
        influence(tmp_path, wider, RowsDataModule(rows, queries=rows[:2]))


def test_query_longer_than_the_context_is_refused(tmp_path, module, rows, factors):
    module.config = type("Config", (), {"max_position_embeddings": 6})()
    long_query = {"input_ids": list(range(9)), "labels": [-100, -100] + list(range(2, 9)), "index": 7}
    with pytest.raises(DataError, match="dataset index 7 has 9 tokens, longer than the model's context of 6"):
        influence(tmp_path, module, RowsDataModule([r for r in rows if len(r["input_ids"]) <= 6], queries=[long_query]))


def test_empty_forget_or_retain_set_is_refused(tmp_path, module, rows, factors):
    with pytest.raises(DataError, match="forget examples are empty"):
        token_influence(tmp_path, module, RowsDataModule(rows, forget=[], retain=rows))
    with pytest.raises(DataError, match="retain examples are empty"):
        token_influence(tmp_path, module, RowsDataModule(rows, forget=rows, retain=[]))


def test_rank_larger_than_the_gradient_is_refused(tmp_path, module, rows, factors):
    with pytest.raises(ModelError, match=r"layer 'net.inp': query_gradient_rank=6 is not between 1 and the rank of a \(5, 6\)"):
        influence(tmp_path, module, RowsDataModule(rows, queries=rows[:2]), query_gradient_rank=6)


def test_loss_of_the_wrong_shape_names_the_expected_shape(tmp_path, module, rows, factors):
    def token_losses(pl_module, batch):  # (B, T) where (B,) is expected
        return pl_module.per_token_loss(batch)

    with pytest.raises(ModelError, match=r"loss_fn .* must return a tensor of shape \(2,\) for this batch; got \(2, \d+\)"):
        influence(tmp_path, module, RowsDataModule(rows, batch_size=2, queries=rows[:2]), loss_fn=token_losses)
    with pytest.raises(ModelError, match=r"token_loss_fn .* shape \(3, \d+\) for this batch; got \(3,\)"):
        token_influence(tmp_path, module, RowsDataModule(rows[:3], batch_size=3, forget=rows[:2], retain=rows[2:]),
                        token_loss_fn=lambda m, b: m.per_example_loss(b))



def test_resume_over_another_predict_set_keeps_only_this_pass_rows(tmp_path, module, rows, factors):
    with pytest.raises(KilledRun):
        callback = InfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "i"), chunk_size=4,
                                     dtype="float64")
        _trainer(tmp_path, [callback, KillAfterBatches(2)]).predict(
            module, RowsDataModule(rows, batch_size=4, queries=rows[:2]), return_predictions=False)
    subset = rows[4:16]  # the killed run's chunks also hold rows 0-3, which this pass does not cover
    scores, _ = influence(tmp_path, module, RowsDataModule(subset, batch_size=4, queries=rows[:2]), name="i",
                          chunk_size=4)
    assert scores["train_indices"].tolist() == list(range(4, 16))
    assert json.loads((tmp_path / "i" / "scores.json").read_text())["resumed_examples"] == 4
    torch.testing.assert_close(scores["scores"], reference_scores(module, factors, rows[:2], subset), rtol=1e-8, atol=0)


def test_one_callback_runs_twice_without_leftover_hooks(tmp_path, module, rows, factors):
    data = RowsDataModule(rows, batch_size=5, queries=rows[:2])
    callback = InfluenceCallback(factors=str(tmp_path / "factors"), output_dir=str(tmp_path / "twice"), dtype="float64")
    results = []
    for _ in range(2):
        _trainer(tmp_path, [callback]).predict(module, data, return_predictions=False)
        results.append(load_file(str(tmp_path / "twice" / "scores.safetensors"))["scores"])
        assert all(not m._forward_hooks for m in module.modules())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert callback.preconditioned == {}  # released after writing


def test_skinny_product_either_way_equals_the_explicit_sum(monkeypatch):
    """``skinny_product`` times both BLAS layouts once per kind and keeps the faster: either layout gives
    ``Σ_k left[q, k]·right[b, k]``, and later products of that kind reuse the choice."""
    from lit_attrib.ops import influence

    monkeypatch.setattr(influence, "_skinny_choice", {})
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(5, 1000, dtype=torch.float64, generator=generator)
    right = torch.randn(3, 1000, dtype=torch.float64, generator=generator)
    expected = (left.unsqueeze(1) * right.unsqueeze(0)).sum(-1)  # (Q, B), no BLAS
    for choice in (0, 1):
        monkeypatch.setattr(influence, "_skinny_choice", {})
        result = influence.skinny_product(left, right)
        key = next(iter(influence._skinny_choice))
        assert key[:2] == ((5, 1000), (3, 1000))
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
        influence._skinny_choice[key] = choice  # the other layout, reused from now on
        torch.testing.assert_close(influence.skinny_product(left, right), expected, rtol=1e-12, atol=1e-12)
    assert influence._skinny_choice[key] == 1 and len(influence._skinny_choice) == 1
