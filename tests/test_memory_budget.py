"""Pairwise influence in bounded memory: layer groups under ``memory_budget`` give the scores of one pass,
a budget that cannot hold one layer stops before any forward, narrow query storage stays within its
stated error, and per-example gradients are held one layer at a time."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from lightning.pytorch import Trainer
from reference_models import RowsDataModule, TinyModule, TinyNet, make_rows
from safetensors.torch import load_file
from test_influence import reference_scores
from test_kfac import LAYERS, collect

from lit_attrib.callbacks import InfluenceCallback
from lit_attrib.callbacks.influence import parse_bytes
from lit_attrib.errors import ConfigError
from lit_attrib.ops.gradients import ExampleGradients
from lit_attrib.ops.influence import LayerMemory, partition_layers, partition_need


@pytest.fixture(scope="module")
def rows():
    return make_rows(count=12)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, rows):
    """The model and its factors, collected once for the module (nothing below changes the weights). Width 16:
    its query gradients outweigh the partial scores that layer groups hold, so that groups can pay off."""
    folder = tmp_path_factory.mktemp("budget")
    module = TinyModule()
    torch.manual_seed(0)
    module.net = TinyNet(width=16)
    module = module.double()
    factors = collect(folder, module, RowsDataModule(rows, batch_size=6), stage="predict")
    return folder, module, factors


def run(folder, module, data, name, **kwargs):
    callback = InfluenceCallback(factors=str(folder / "factors"), output_dir=str(folder / name),
                                 **{"dtype": "float64", **kwargs})
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=folder, callbacks=[callback]).predict(
        module, data, return_predictions=False)
    metadata = json.loads((folder / name / "scores.json").read_text())
    return load_file(str(folder / name / "scores.safetensors")), metadata, callback


def grouping_budget(memory: dict) -> int:
    """A budget below the one-pass need that still holds the largest layer (with the grouped partial scores)."""
    layers = {name: LayerMemory(**sizes) for name, sizes in memory["layers"].items()}
    return max(partition_need(layers, [name]) for name in layers) + memory["grouped_partial_scores"]


# --------------------------------------------------------------------------- layer groups
@pytest.mark.parametrize("token_scores", [False, True], ids=["sequence", "tokens"])
def test_budget_below_the_need_runs_in_layer_groups_with_the_same_scores(setup, rows, token_scores):
    folder, module, factors = setup
    queries = rows[:3]
    data = RowsDataModule(rows, batch_size=5, queries=queries)
    whole, whole_meta, _ = run(folder, module, data, f"whole-{token_scores}", memory_budget="1GB",
                               token_scores=token_scores)
    assert whole_meta["memory"]["partitions"] == [LAYERS]
    budget = grouping_budget(whole_meta["memory"])
    assert budget < whole_meta["memory"]["need"]
    # Shuffled, in batches of another size: the groups' partial scores must meet by dataset index.
    torch.manual_seed(3)
    grouped, meta, callback = run(folder, module, RowsDataModule(rows, batch_size=4, shuffle=True, queries=queries),
                                  f"grouped-{token_scores}", memory_budget=budget, token_scores=token_scores)
    groups = meta["memory"]["partitions"]
    assert len(groups) >= 2 and [name for group in groups for name in group] == LAYERS
    layers = {name: LayerMemory(**sizes) for name, sizes in meta["memory"]["layers"].items()}
    assert all(partition_need(layers, group) + meta["memory"]["partial_scores"] <= budget for group in groups)
    assert grouped["train_indices"].tolist() == whole["train_indices"].tolist() == list(range(len(rows)))
    torch.testing.assert_close(grouped["scores"], whole["scores"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grouped["scores"], reference_scores(module, factors, queries, rows), rtol=1e-8, atol=0)
    if token_scores:
        width = min(grouped["token_scores"].shape[-1], whole["token_scores"].shape[-1])
        torch.testing.assert_close(grouped["token_scores"][..., :width], whole["token_scores"][..., :width],
                                   rtol=1e-12, atol=1e-15)
        assert grouped["token_scores"][..., width:].abs().sum() == 0 and whole["token_scores"][..., width:].abs().sum() == 0


def test_layer_groups_with_low_rank_queries_equal_one_pass(setup, rows):
    folder, module, _ = setup
    data = RowsDataModule(rows, batch_size=5, queries=rows[:2])
    whole, whole_meta, _ = run(folder, module, data, "rank-whole", memory_budget="1GB", query_gradient_rank=2)
    grouped, meta, _ = run(folder, module, data, "rank-grouped", memory_budget=grouping_budget(whole_meta["memory"]),
                           query_gradient_rank=2)
    assert len(meta["memory"]["partitions"]) >= 2
    torch.testing.assert_close(grouped["scores"], whole["scores"], rtol=1e-12, atol=1e-15)


def test_budget_too_small_for_one_layer_is_refused_before_any_forward(setup, rows):
    folder, module, _ = setup
    forwards = []
    handle = module.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ConfigError, match=r"memory_budget 100 B cannot hold even one layer: 'net\.\w+' alone "
                                              r"needs .*query_dtype.*query_gradient_rank"):
            run(folder, module, RowsDataModule(rows, queries=rows[:2]), "tiny", memory_budget=100)
    finally:
        handle.remove()
    assert forwards == []
    assert not (folder / "tiny" / "scores.json").exists()


@pytest.mark.parametrize("value", ["lots", "-1GB", "4XB", 0, True])
def test_unreadable_budget_is_refused(value):
    with pytest.raises(ConfigError, match="memory_budget must be a positive size"):
        InfluenceCallback(factors="f", memory_budget=value)


def test_budget_sizes_are_powers_of_1024():
    assert parse_bytes("4GB", "b") == 4 * 2**30
    assert parse_bytes(" 1.5 mib", "b") == 3 * 2**19
    assert parse_bytes(1e6, "b") == 1_000_000
    assert parse_bytes("2048", "b") == 2048


def test_partition_layers_makes_the_fewest_consecutive_groups_within_the_budget():
    sizes = [(5, 9), (7, 1), (3, 3), (8, 2), (1, 6), (4, 4)]
    memory = {f"l{i}": LayerMemory(query, working) for i, (query, working) in enumerate(sizes)}
    names = list(memory)
    for budget in (14, 16, 18, 25, 40):
        groups = partition_layers(memory, budget)
        assert [name for group in groups for name in group] == names
        assert all(partition_need(memory, group) <= budget for group in groups)
        fewest = min(len(cuts) + 1 for count in range(len(names))
                     for cuts in itertools.combinations(range(1, len(names)), count)
                     if all(partition_need(memory, names[a:b]) <= budget
                            for a, b in zip((0, *cuts), (*cuts, len(names)))))
        assert len(groups) == fewest
    with pytest.raises(ValueError, match="l0"):
        partition_layers(memory, 13)  # l0 alone needs 5 + 9


# ------------------------------------------------------------------------ query storage
@pytest.mark.parametrize(("query_dtype", "unit"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_narrow_query_storage_agrees_within_its_rounding(setup, rows, query_dtype, unit):
    folder, module, factors = setup
    queries = rows[:3]
    scores, meta, _ = run(folder, module, RowsDataModule(rows, queries=queries), f"narrow-{query_dtype}",
                          query_dtype=query_dtype)
    expected = reference_scores(module, factors, queries, rows)
    error = meta["memory"]["query_storage_error"]
    assert meta["memory"]["query_dtype"] == query_dtype and meta["arguments"]["query_dtype"] == query_dtype
    assert 0 < error <= unit  # the gradients were rounded, by at most the format's unit roundoff
    # Stated tolerance: each score within 4 units of roundoff of the largest score of its query.
    scale = expected.abs().amax(1, keepdim=True)
    assert ((scores["scores"] - expected).abs() <= 4 * unit * scale).all()
    assert not torch.equal(scores["scores"], expected)


@pytest.mark.parametrize("query_storage", ["memory", "disk"])
def test_rotation_back_in_bfloat16_agrees_within_its_rounding(setup, rows, query_storage):
    """``precondition_dtype: bfloat16``: scores within bfloat16's rounding of the float64 reference, the measured
    error recorded (and in the arguments, as it changes the scores); stored in float64 as asked."""
    folder, module, factors = setup
    queries = rows[:3]
    scores, meta, _ = run(folder, module, RowsDataModule(rows, queries=queries), f"rotated-bf16-{query_storage}",
                                 precondition_dtype="bfloat16", query_storage=query_storage)
    expected = reference_scores(module, factors, queries, rows)
    error, unit = meta["memory"]["precondition_error"], 2.0**-8
    assert meta["arguments"]["precondition_dtype"] == "bfloat16" and meta["memory"]["query_storage_error"] == 0
    assert 0 < error <= 2 * unit
    scale = expected.abs().amax(1, keepdim=True)
    assert ((scores["scores"] - expected).abs() <= 4 * unit * scale).all()
    assert not torch.equal(scores["scores"], expected)
    assert scores["scores"].dtype == torch.float64


def test_rotation_back_in_bfloat16_then_cut_to_low_rank(setup, rows):
    """Rank-r query gradients from a bfloat16 rotation back: cut in float64 from the rounded gradients, so the
    scores are those of rank r within bfloat16's rounding."""
    folder, module, _ = setup
    data = RowsDataModule(rows, queries=rows[:3])
    exact, _, _ = run(folder, module, data, "rank-exact", query_gradient_rank=2)
    rounded, meta, _ = run(folder, module, data, "rank-bf16", query_gradient_rank=2, precondition_dtype="bfloat16")
    assert 0 < meta["memory"]["precondition_error"] <= 2.0**-7
    scale = exact["scores"].abs().amax(1, keepdim=True)
    assert ((rounded["scores"] - exact["scores"]).abs() <= 2.0**-6 * scale).all()
    assert rounded["scores"].dtype == torch.float64 and not torch.equal(rounded["scores"], exact["scores"])


def test_rotation_back_beyond_one_percent_is_refused(setup, rows, monkeypatch):
    folder, module, _ = setup
    monkeypatch.setattr("lit_attrib.callbacks.influence.MAX_STORAGE_ERROR", 1e-9)
    with pytest.raises(ConfigError, match=r"precondition_dtype bfloat16 changes layer 'net\.\w+''s .* null"):
        run(folder, module, RowsDataModule(rows, queries=rows[:2]), "rotated-refused", precondition_dtype="bfloat16")
    with pytest.raises(ConfigError, match="precondition_dtype must be"):
        InfluenceCallback(factors="f", precondition_dtype="int8")


def test_query_storage_that_flushes_gradients_to_zero_is_refused():
    callback = InfluenceCallback(factors="f", dtype="float32", query_dtype="float16")
    layer = type("Layer", (), {"name": "net.inp"})()
    small = torch.full((2, 3, 4), 1e-9)
    with pytest.raises(ConfigError, match=r"'net\.inp'.*float16.*bfloat16"):
        callback._narrow(layer, small)
    with pytest.raises(ConfigError, match="overflow query_dtype float16"):
        callback._narrow(layer, torch.full((2, 3), 1e6))
    assert callback._narrow(layer, torch.ones(2, 3)).dtype == torch.float16


def test_unknown_query_dtype_is_refused():
    with pytest.raises(ConfigError, match="query_dtype must be one of"):
        InfluenceCallback(factors="f", query_dtype="int8")


# --------------------------------------------------------------------------- on disk
@pytest.mark.parametrize("query_dtype", [None, "bfloat16"])
def test_query_gradients_on_disk_give_the_scores_of_memory_one_layer_resident(setup, rows, monkeypatch, query_dtype):
    """``query_storage: disk``: the same scores as in memory (and as the reference), the queries read out of
    order; during the training pass no layer's query gradients are held but the one being scored (the file
    is read into one buffer per shape), so a budget that would split the layers in memory runs in one pass;
    the scratch file is gone afterwards."""
    from lit_attrib.io import ScratchTensors
    from lit_attrib.ops.influence import PairwiseScores

    folder, module, factors = setup
    queries = [rows[5], rows[1], rows[3]]
    narrow = {} if query_dtype is None else {"query_dtype": query_dtype}
    memory, memory_meta, _ = run(folder, module, RowsDataModule(rows, batch_size=5, queries=queries), f"in-memory-{query_dtype}",
                                 memory_budget="1GB", **narrow)
    # A budget under which the query gradients in memory would need layer groups: on disk, one pass fits.
    budget = grouping_budget(memory_meta["memory"])
    assert budget < memory_meta["memory"]["need"]
    held, add = [], PairwiseScores.add

    def watching_add(self, layer, activations, gradients):
        assert isinstance(self.preconditioned, ScratchTensors)
        held.append(len(self.preconditioned._buffers))
        add(self, layer, activations, gradients)

    monkeypatch.setattr(PairwiseScores, "add", watching_add)
    disk, meta, callback = run(folder, module, RowsDataModule(rows, batch_size=5, queries=queries), f"on-disk-{query_dtype}",
                               query_storage="disk", memory_budget=budget, **narrow)
    assert meta["memory"]["query_storage"] == "disk" and "query_storage" not in meta["arguments"]
    assert meta["memory"]["partitions"] == [LAYERS] and meta["memory"]["need"] <= budget
    shapes = {tuple(layer.gradient_shape) for layer in callback.layers.values()}
    assert held and max(held) <= len(shapes)  # one buffer per layer shape, never every layer's gradients
    torch.testing.assert_close(disk["scores"], memory["scores"], rtol=0, atol=0)
    torch.testing.assert_close(disk["query_indices"], torch.tensor([1, 3, 5]))
    if query_dtype is None:
        in_order = [rows[1], rows[3], rows[5]]  # the scores' rows are the queries in dataset index order
        torch.testing.assert_close(disk["scores"], reference_scores(module, factors, in_order, rows), rtol=1e-8, atol=0)
    assert not list((folder / f"on-disk-{query_dtype}").glob(".query-gradients-*"))
    assert callback.preconditioned == {}


def test_the_training_pass_holds_no_factors_once_the_queries_are_preconditioned(setup, rows, monkeypatch):
    """Only the eigenbases and Λ are loaded, and they are dropped once the query gradients are preconditioned:
    the training pass needs only those (on SmolLM2 the factors file is 2.9 GB)."""
    folder, module, factors = setup
    seen = []
    score = InfluenceCallback._score

    def watching(self, trainer, pl_module, batch):
        seen.append((sum(len(tensors) for tensors in self.factors.modules.values()), set(self.factors.modules)))
        return score(self, trainer, pl_module, batch)

    monkeypatch.setattr(InfluenceCallback, "_score", watching)
    scores, _, _ = run(folder, module, RowsDataModule(rows, queries=rows[:2]), "no-factors")
    assert seen and all(count == 0 and names == set(LAYERS) for count, names in seen)
    torch.testing.assert_close(scores["scores"], reference_scores(module, factors, rows[:2], rows), rtol=1e-8, atol=0)


def test_query_gradients_on_disk_are_deleted_when_the_pass_fails(setup, rows, monkeypatch):
    from lit_attrib.ops.influence import PairwiseScores

    folder, module, _ = setup

    def failing_add(self, layer, activations, gradients):
        assert list((folder / "failing").glob(".query-gradients-rank0.tmp"))  # written before the training pass
        raise RuntimeError("stopped in the training pass")

    monkeypatch.setattr(PairwiseScores, "add", failing_add)
    with pytest.raises(RuntimeError, match="stopped in the training pass"):
        run(folder, module, RowsDataModule(rows, queries=rows[:2]), "failing", query_storage="disk")
    assert not list((folder / "failing").glob(".query-gradients-*"))


def test_query_storage_arguments_are_checked():
    with pytest.raises(ConfigError, match="query_storage must be 'memory' or 'disk'"):
        InfluenceCallback(factors="f", query_storage="ssd")
    with pytest.raises(ConfigError, match="query_storage 'disk' is for full-rank query gradients"):
        InfluenceCallback(factors="f", query_storage="disk", query_gradient_rank=2)


def test_scratch_tensors_write_row_ranges_and_read_back(tmp_path):
    from lit_attrib.io import ScratchTensors

    store = ScratchTensors(tmp_path / "s.tmp", {"a": ((5, 3, 4), torch.float32), "b": ((2, 7), torch.bfloat16),
                                                "c": ((5, 3, 4), torch.float32)})
    a, b, c = torch.randn(5, 3, 4), torch.randn(2, 7).bfloat16(), torch.randn(5, 3, 4)
    store.write("a", 3, a[3:])
    store.write("a", 0, a[:3])
    store.write("b", 0, b)
    store.write("c", 0, c.double())  # cast to the layout's dtype
    assert torch.equal(store["a"], a) and torch.equal(store["b"], b) and torch.equal(store["c"], c)
    assert store["a"].data_ptr() == store["c"].data_ptr()  # one buffer per shape and dtype
    assert list(store) == ["a", "b", "c"] and (tmp_path / "s.tmp").stat().st_size == (2 * 60 * 4 + 14 * 2)
    with pytest.raises(ValueError, match="do not fit 'a'"):
        store.write("a", 4, a[:2])
    store.close()
    store.close()
    assert not (tmp_path / "s.tmp").exists()
    with pytest.raises(RuntimeError, match="closed"):
        store["a"]


# --------------------------------------------------------------------- one layer at a time
def test_query_gradients_hold_one_layers_per_example_gradients_at_a_time(setup, rows, monkeypatch):
    folder, module, factors = setup
    held = []
    add = ExampleGradients.add

    def counting_add(self, layer, activations, gradients):
        add(self, layer, activations, gradients)
        held.append(len(self._uses) if self.per_example else 0)

    monkeypatch.setattr(ExampleGradients, "add", counting_add)
    scores, _, _ = run(folder, module, RowsDataModule(rows, batch_size=6, queries=rows[:4]), "streamed")
    assert held and max(held) == 1  # the looped layer's three uses accumulate in one; each layer leaves when done
    torch.testing.assert_close(scores["scores"], reference_scores(module, factors, rows[:4], rows), rtol=1e-8, atol=0)


def test_take_hands_a_layer_over_and_end_batch_gives_the_rest():
    layers = {name: type("L", (), {"name": name, "has_bias": False, "gradient_shape": (2, 3)})() for name in "ab"}
    accumulator = ExampleGradients(layers, torch.float64, per_example=True)
    accumulator.begin_batch(1)
    a, g = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 4, 2, dtype=torch.float64)
    accumulator.add(layers["a"], a, g)
    taken = accumulator.take("a")
    torch.testing.assert_close(taken.full()[0], g[0].T @ a[0])
    rest = accumulator.end_batch()
    assert list(rest) == ["b"] and rest["b"].full().abs().sum() == 0 and accumulator.count == 1


def test_token_gradients_join_every_use_and_rotate_like_the_full_gradient():
    """Per-example gradients are handed over as each layer's uses' tokens; rotating them into an eigenbasis, token by
    token (few tokens) or multiplied out (many), equals ``Q_Gᵀ DW Q_A`` of the explicit ``DW``."""
    from lit_attrib.ops.kfac import TokenGradients, rotate_gradient

    torch.manual_seed(0)
    layers = {name: type("L", (), {"name": name, "has_bias": False, "gradient_shape": (5, 6)})() for name in "ab"}
    accumulator = ExampleGradients(layers, torch.float64, per_example=True)
    accumulator.begin_batch(3)
    uses = [(torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)) for _ in range(2)]
    for a, g in uses:
        accumulator.add(layers["a"], a, g)
    taken = accumulator.take("a")
    assert isinstance(taken, TokenGradients) and taken.shape == (3, 5, 6)
    explicit = sum(torch.einsum("bto,bti->boi", g, a) for a, g in uses)
    torch.testing.assert_close(taken.full(), explicit, rtol=1e-12, atol=1e-12)
    rest = accumulator.end_batch()["b"]  # never used: no tokens, a zero gradient
    assert rest.activations.shape == (3, 0, 6) and rest.full().abs().sum() == 0
    q_a = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    q_g = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    expected = q_g.T @ explicit @ q_a
    torch.testing.assert_close(rotate_gradient(taken, q_a, q_g), expected, rtol=1e-12, atol=1e-12)  # 8 tokens: multiplied out
    few = TokenGradients(uses[0][0][:, :2], uses[0][1][:, :2])  # 2 tokens: rotated through them
    torch.testing.assert_close(rotate_gradient(few, q_a, q_g), q_g.T @ few.full() @ q_a, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ scoring in bfloat16
@pytest.mark.parametrize(("query_dtype", "query_storage"), [(None, "memory"), ("bfloat16", "memory"),
                                                           ("bfloat16", "disk")])
def test_training_gradients_in_bfloat16_agree_within_their_rounding(setup, rows, query_dtype, query_storage):
    """``scoring_dtype: bfloat16``: scores within bfloat16's rounding of the float64 reference, with the query
    gradients stored in float64 (DW cast back up for the contraction) or in bfloat16 (both sides narrow); the
    measured error of the training examples' gradients recorded, and part of the arguments."""
    folder, module, factors = setup
    queries = rows[:3]
    name = f"scoring-bf16-{query_dtype}-{query_storage}"
    scores, meta, _ = run(folder, module, RowsDataModule(rows, queries=queries), name, scoring_dtype="bfloat16",
                          query_dtype=query_dtype, query_storage=query_storage)
    expected = reference_scores(module, factors, queries, rows)
    unit = 2.0**-8
    assert meta["arguments"]["scoring_dtype"] == "bfloat16"
    assert 0 < meta["memory"]["scoring_error"] <= 2 * unit
    scale = expected.abs().amax(1, keepdim=True)
    assert ((scores["scores"] - expected).abs() <= 8 * unit * scale).all()
    assert not torch.equal(scores["scores"], expected) and scores["scores"].dtype == torch.float64
    assert scores["scores"].argmax(1).tolist() == expected.argmax(1).tolist()


def test_scoring_error_is_the_first_examples_gradient_error():
    """PairwiseScores' recorded error equals an explicit one: the first example's ``Σ_t g_t a_tᵀ`` from bfloat16
    ``a`` and ``g`` against float64, relative (Frobenius); the largest over layers and batches is kept."""
    from lit_attrib.layers import layer_info
    from lit_attrib.ops.influence import PairwiseScores

    torch.manual_seed(3)
    layers = [layer_info(name, torch.nn.Linear(7, 5, bias=False)) for name in ("one", "two")]
    stored = {layer.name: torch.randn(3, 5, 7, dtype=torch.float64) for layer in layers}
    scores = PairwiseScores(stored, torch.float64, scoring_dtype=torch.bfloat16)
    expected = 0.0
    for _ in range(2):
        scores.begin_batch()
        exact_scores = torch.zeros(4, 3, dtype=torch.float64)
        for layer in layers:
            a, g = torch.randn(4, 6, 7, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
            scores.add(layer, a, g)
            exact = g[0].T @ a[0]
            narrow = (g[0].T.bfloat16() @ a[0].bfloat16()).double()
            expected = max(expected, float((narrow - exact).norm() / exact.norm()))
            exact_scores += torch.einsum("qoi,bti,bto->bq", stored[layer.name], a, g)
        result = scores.end_batch()["scores"]  # (B, Q)
        torch.testing.assert_close(result, exact_scores, rtol=0, atol=2.0**-6 * float(exact_scores.abs().max()))
        assert not torch.equal(result, exact_scores)
    assert scores.scoring_error.value == pytest.approx(expected, rel=1e-6)
    assert 0 < expected < 2.0**-6


def test_scoring_dtype_is_refused_where_it_cannot_apply_or_changes_too_much(setup, rows, monkeypatch):
    folder, module, _ = setup
    with pytest.raises(ConfigError, match="scoring_dtype must be 'bfloat16' or null"):
        InfluenceCallback(factors="f", scoring_dtype="float16")
    for extra in ({"query_gradient_rank": 2}, {"token_scores": True}):
        with pytest.raises(ConfigError, match="scoring_dtype bfloat16 is for full-rank scores"):
            InfluenceCallback(factors="f", scoring_dtype="bfloat16", **extra)
    monkeypatch.setattr("lit_attrib.callbacks.influence.MAX_STORAGE_ERROR", 1e-9)
    with pytest.raises(ConfigError, match=r"scoring_dtype bfloat16 changes the training examples' per-layer "
                                          r"gradients by .* set scoring_dtype null"):
        run(folder, module, RowsDataModule(rows, queries=rows[:2]), "scoring-refused", scoring_dtype="bfloat16")


def test_memory_plan_counts_the_narrow_training_gradients():
    from lit_attrib.ops.influence import layer_memory

    shape, queries, batch = (8, 6), 4, 5
    full = 48
    plain = layer_memory(shape, queries, 2, batch, 10, None, 4, 4)
    narrow = layer_memory(shape, queries, 2, batch, 10, None, 4, 4, scoring_size=2)
    both = layer_memory(shape, queries, 2, batch, 10, None, 4, 2, scoring_size=2)
    cast = layer_memory(shape, queries, 2, batch, 10, None, 4, 2)
    train = batch * full * 4 + queries * batch * 4
    assert plain.working == max(4 * 2 * full * 4 + queries * full * 4, train)
    assert narrow.working == max(4 * 2 * full * 4 + queries * full * 4, train + batch * full * 2)
    assert cast.working == max(4 * 2 * full * 4 + queries * full * 2, train + queries * full * 4)
    assert both.working == max(4 * 2 * full * 4 + queries * full * 2, queries * batch * 4 + batch * full * 2)
