"""Querying a gradient index: `lit-attrib index-query` and the Python API give the same hits and scores;
streamed search equals the full score matrix; bad input (another model, projection or weights, an empty
or damaged index, a query longer than the context, FAISS missing) is one clear error."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TOKENIZER

from lit_attrib.cli import main
from lit_attrib.data import TextDataModule
from lit_attrib.errors import ArtifactError, ConfigError
from lit_attrib.index import GradientIndex
from lit_attrib.modules import CausalLMModule

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
INDEX = str(REPO / "configs" / "index_quickstart.yaml")
MODEL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}
DATA = {"path": str(REPO / "data" / "facts" / "facts.jsonl"), "tokenizer": str(TOKENIZER), "format": "qa",
        "input_column": "question", "output_column": "answer", "max_length": 64, "num_samples": 30,
        "val_size": 6, "seed": 42, "eval_batch_size": 4, "predict_split": "train", "predict_content": "examples",
        "query_split": "val"}


def _overlay(folder, name: str, model: dict | None = None, data: dict | None = None, **index_args) -> str:
    """The quickstart with a tiny model in float64, 24 training rows, the index (float64 rows) in ``folder``."""
    config = {
        "trainer": {"logger": False, "enable_progress_bar": False, "precision": "64-true", "accelerator": "cpu",
                    "default_root_dir": str(folder),
                    "callbacks": [{"class_path": "lit_attrib.callbacks.GradientIndexCallback",
                                   "init_args": {"stages": ["predict"], "projection_dim": 4, "seed": 3,
                                                 "storage_dtype": "float64", "dtype": "float64",
                                                 "output_dir": str(folder / "index"), "overwrite": True,
                                                 **index_args}}]},
        "model": {"init_args": {"config": {**MODEL, **(model or {})}}},
        "data": {"init_args": {**DATA, **(data or {})}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _query(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(["index-query", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An index of the tiny model's 24 training rows, built by `lit-attrib predict`."""
    folder = tmp_path_factory.mktemp("index")
    config = _overlay(folder, "build")
    main(["predict", "-c", QUICKSTART, "-c", INDEX, "-c", config])
    return folder, config


def _api_module(**model) -> CausalLMModule:
    module = CausalLMModule(config={**MODEL, **model}, tokenizer=str(TOKENIZER))
    module.configure_model()
    return module.double().eval()


def _api_queries(**data) -> torch.utils.data.DataLoader:
    datamodule = TextDataModule(**{**DATA, **data})
    datamodule.setup("predict")
    return datamodule.query_dataloader()


def test_cli_and_api_agree(built, tmp_path, capsys):
    folder, config = built
    code, out, err = _query(["-c", QUICKSTART, "-c", INDEX, "-c", config, "--top_k", "5", "--per_layer", "true",
                             "--output_dir", str(tmp_path / "cli")], capsys)
    assert code == 0, err
    assert "query gradients:" in out and "search:" in out  # the latency of both, separately
    rows = [json.loads(line) for line in (tmp_path / "cli" / "topk.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "cli" / "query.json").read_text())
    assert summary["num_queries"] == len(rows) == 6 and summary["num_indexed"] == 24 and summary["method"] == "exact"

    index = GradientIndex(folder / "index")
    module = _api_module()
    query_rows, ids = index.query_rows(module, _api_queries())
    result = index.search(query_rows, k=5, per_layer=True)
    order = torch.argsort(ids)
    assert [row["query_index"] for row in rows] == ids[order].tolist()
    cli_scores = torch.tensor([[hit["score"] for hit in row["helpful"]] for row in rows], dtype=torch.float64)
    cli_harmful = torch.tensor([[hit["score"] for hit in row["harmful"]] for row in rows], dtype=torch.float64)
    assert [[hit["index"] for hit in row["helpful"]] for row in rows] == result.ids[order].tolist()
    assert [[hit["index"] for hit in row["harmful"]] for row in rows] == result.harmful_ids[order].tolist()
    torch.testing.assert_close(cli_scores, result.scores[order], rtol=1e-9, atol=0)
    torch.testing.assert_close(cli_harmful, result.harmful_scores[order], rtol=1e-9, atol=0)
    # the hits are the best of the full score matrix, their layers add up to them, and they carry their text
    full = index.scores(query_rows)
    torch.testing.assert_close(result.scores, full.topk(5, dim=1).values, rtol=1e-12, atol=0)
    layers = torch.tensor([[list(hit["layers"].values()) for hit in row["helpful"]] for row in rows],
                          dtype=torch.float64)
    torch.testing.assert_close(layers.sum(-1), cli_scores, rtol=1e-9, atol=1e-12 * float(cli_scores.abs().max()))
    assert all(hit["text"].startswith("Question:") for row in rows for hit in row["helpful"] + row["harmful"])
    assert all(row["query"].startswith("Question:") for row in rows)


def test_streamed_search_equals_the_full_score_matrix(built):
    index = GradientIndex(built[0] / "index")
    rows, _ = index.query_rows(_api_module(), _api_queries())
    full = index.scores(rows)
    for block_rows in (1, 5, 24):
        result = index.search(rows, k=7, block_rows=block_rows)
        torch.testing.assert_close(result.scores, full.topk(7, dim=1).values, rtol=1e-12, atol=0)
        torch.testing.assert_close(result.harmful_scores, full.topk(7, dim=1, largest=False).values,
                                   rtol=1e-12, atol=0)
    per_layer = index.scores(rows, curvature="identity", per_layer=True, block_rows=5)
    torch.testing.assert_close(per_layer.sum(-1), index.scores(rows, curvature="identity"), rtol=1e-10, atol=1e-12)


def test_approximate_search_finds_the_exact_hits(built):
    pytest.importorskip("faiss")
    index = GradientIndex(built[0] / "index")
    rows, _ = index.query_rows(_api_module(), _api_queries())
    exact = index.search(rows, k=5)
    approximate = index.search(rows, k=5, approximate=True)  # 24 rows: one list, every row a candidate
    assert approximate.method == "faiss" and approximate.ids.tolist() == exact.ids.tolist()
    torch.testing.assert_close(approximate.scores, exact.scores, rtol=1e-9, atol=0)
    assert approximate.harmful_ids.tolist() == exact.harmful_ids.tolist()
    assert list((built[0] / "index" / "approximate").glob("*.faiss"))  # built once, then cached
    # 4 lists of about 6 rows, one visited: fewer candidates than k, so those queries are searched exactly
    index.approximate_index = lambda: GradientIndex.approximate_index(index, lists=4)
    few = index.search(rows, k=10, approximate=True, nprobe=1)
    assert few.ids.tolist() == index.search(rows, k=10).ids.tolist()


def test_missing_faiss_names_the_extra(built, monkeypatch):
    index = GradientIndex(built[0] / "index")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ConfigError, match=r"lit-attrib\[faiss\]"):
        index.search(torch.zeros(1, index.width, dtype=torch.float64), approximate=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"intermediate_size": 24}}, "built on other layers"),
    ({"model": {"initializer_range": 0.05}}, "built at other weights"),
    ({"projection_dim": 8}, "built with other projections"),
    ({"model": {"max_position_embeddings": 16}}, "longer than the model's context"),
])
def test_a_query_that_does_not_fit_the_index_is_one_clear_error(built, tmp_path, capsys, change, message):
    folder, _ = built
    config = _overlay(folder, "other", change.get("model"), **{k: v for k, v in change.items() if k != "model"})
    code, _, err = _query(["-c", QUICKSTART, "-c", INDEX, "-c", config, "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "topk.jsonl").exists()


def test_empty_and_damaged_indexes_are_refused(built, tmp_path, capsys):
    folder, config = built
    copy = tmp_path / "index"
    copy.mkdir()
    for path in (folder / "index").iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    shard = np.load(copy / "rows-rank000.npy")
    args = ["-c", QUICKSTART, "-c", INDEX, "-c", config, "--index", str(copy), "--output_dir", str(tmp_path / "out")]

    shard[7, 3] = np.nan  # a damaged row: the file still reads
    np.save(copy / "rows-rank000.npy", shard)
    code, _, err = _query(args, capsys)
    assert code == 2 and "dataset id" in err and "damaged" in err, err

    (copy / "rows-rank000.npy").write_bytes((copy / "rows-rank000.npy").read_bytes()[:300])  # a cut file
    code, _, err = _query(args, capsys)
    assert code == 2 and "damaged" in err, err

    np.save(copy / "rows-rank000.npy", shard[:0])
    np.save(copy / "ids-rank000.npy", np.zeros(0, np.int64))
    code, _, err = _query(args, capsys)
    assert code == 2 and "holds no rows" in err, err

    code, _, err = _query([*args[:-4], "--index", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no gradient index" in err, err
    with pytest.raises(ArtifactError, match="another index"):
        GradientIndex(folder / "index").search(torch.zeros(2, 5, dtype=torch.float64))


def _float16_index(folder, rows: torch.Tensor) -> GradientIndex:
    """An index of ``rows`` (float16 storage, one layer of width ``rows.shape[1]``) written as a build writes it."""
    from lit_attrib.artifacts.index import shard_names, write_metadata, write_shard

    folder.mkdir()
    write_shard(folder, 0, rows, np.arange(len(rows)), np.dtype(np.float16))
    width = rows.shape[1]
    write_metadata(folder, {"name": "synthetic", "arguments": {}, "collection": {}, "seed": 0, "width": width,
                            "layers": {"layer": {"k_out": width // 8, "k_in": 8}}, "storage_dtype": "float16",
                            "shards": [shard_names(0)]})
    return GradientIndex(folder)


def test_float16_search_is_exact_where_float16_products_cannot_tell_rows_apart(tmp_path, monkeypatch):
    """Rows whose scores differ by 1e-4 (float16 resolves 5e-4) and rows of large cancelling entries: the fused
    float16 search returns exactly the float64 brute force's top and bottom k, in order, with float32 scores."""
    generator = torch.Generator().manual_seed(0)
    width = 4096
    direction = torch.randn(width, generator=generator)
    near = direction * (1 + 1e-4 * torch.randperm(40, generator=generator)[:, None])  # 40 near-ties
    cancelling = torch.randn(20, width, generator=generator) * 300  # large entries, scores of any size
    cancelling[:, : width // 2] = -cancelling[:, width // 2:]  # ... that cancel against a query of equal halves
    noise = torch.randn(500, width, generator=generator)
    rows = torch.cat([near, -near, cancelling, noise])[torch.randperm(580, generator=generator)]
    index = _float16_index(tmp_path / "index", rows)
    query = torch.cat([direction[: width // 2], direction[: width // 2]])[None] + direction[None]
    stored = torch.from_numpy(np.load(tmp_path / "index" / "rows-rank000.npy")).double()
    exact = (stored @ query[0].double())
    norms = np.load(tmp_path / "index" / "norms-rank000.npy")  # written with the shard, never below the true norm
    assert (norms >= stored.norm(dim=1).numpy()).all() and np.allclose(norms, stored.norm(dim=1).numpy(), rtol=1e-6)
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a, **kw: calls.append(a[0].dtype) or real_mv(*a, **kw))
    result = index.search(query, k=10, curvature="identity", block_rows=64)
    assert calls and set(calls) == {torch.float16}  # the fused float16 path ran, chunk by chunk
    assert result.ids[0].tolist() == exact.topk(10).indices.tolist()
    assert result.harmful_ids[0].tolist() == exact.topk(10, largest=False).indices.tolist()
    torch.testing.assert_close(result.scores[0], exact.topk(10).values, rtol=1e-5, atol=0)  # float32 sums
    monkeypatch.setattr("lit_attrib.index.HALF_QUERIES", 0)  # the float32 path agrees
    converted = index.search(query, k=10, curvature="identity", block_rows=64)
    assert converted.ids.tolist() == result.ids.tolist() and converted.harmful_ids.tolist() == result.harmful_ids.tolist()


def test_float16_search_equals_the_float32_path_on_a_built_index(tmp_path, monkeypatch):
    """The quickstart build with float16 rows (norms written with the shard): 1 to 8 queries search in float16,
    with the same hits and scores as the float32 path."""
    config = _overlay(tmp_path, "half", storage_dtype="float16", dtype="float32")
    main(["predict", "-c", QUICKSTART, "-c", INDEX, "-c", config])
    index = GradientIndex(tmp_path / "index")
    assert index._norms is not None and index._shards[0].dtype == np.float16
    rows, _ = index.query_rows(_api_module().float(), _api_queries())
    half = index.search(rows, k=5)
    monkeypatch.setattr("lit_attrib.index.HALF_QUERIES", 0)
    converted = index.search(rows, k=5)
    assert half.ids.tolist() == converted.ids.tolist() and half.harmful_ids.tolist() == converted.harmful_ids.tolist()
    torch.testing.assert_close(half.scores, converted.scores, rtol=1e-5, atol=1e-6)
