"""``lit-attrib index-query``: ask a built gradient index which training examples helped (or hurt) the
model on a file of prompts, a ``generated.jsonl`` of its own answers, or a loader of the datamodule.

::

    lit-attrib predict -c configs/quickstart.yaml -c configs/index_quickstart.yaml --ckpt_path last.ckpt
    lit-attrib index-query -c configs/quickstart.yaml -c configs/index_quickstart.yaml --ckpt_path last.ckpt \\
        --queries runs/quickstart/tensorboard/compare/generated.jsonl

The model, the data and the checkpoint are given as for ``lit-attrib predict`` (the same configs that
built the index): the model is built and its weights loaded by Lightning, the queries are tokenized as
the datamodule tokenizes, and the training texts come from the datamodule's predict set (the set that
was indexed). Only the queries go through the model (one forward/backward per batch); the stored rows
are streamed, or searched with FAISS (``--approximate true``).

Writes ``topk.jsonl`` (each query's ``top_k`` most helpful and most harmful training examples with their
text and score, the layout of ``InfluenceCallback``'s ``topk.jsonl``; with ``--per_layer true`` each hit
also has ``layers``: its score split over the indexed layers) and ``query.json`` (arguments and
latency), both atomically; prints the time of the query gradients and of the search.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_attrib.engine.data import ensure_predict_step, release_predict_step
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.io import write_json, write_jsonl
from lit_attrib.quiet import quiet_known_noise

__all__ = ["FORMAT", "index_query"]

FORMAT = "lit_attrib.index_query/1"
SIGN = "positive = the training example lowers the query's loss (helpful)"
_OWNER = "lit-attrib index-query"


def index_query(
    queries: str = "query",
    index: str | None = None,
    model: LightningModule | None = None,
    data: LightningDataModule | None = None,
    ckpt_path: str | None = None,
    top_k: int = 10,
    curvature: Literal["kfac", "identity"] = "kfac",
    damping: float | None = None,
    per_layer: bool = False,
    approximate: bool = False,
    nprobe: int = 64,
    candidates: int | None = None,
    check_weights: bool = True,
    output_dir: str | None = None,
    threads: int | None = None,
    accelerator: str | None = None,
    precision: str | None = None,
    trainer: dict[str, Any] | None = None,
    seed_everything: int | bool | None = None,
) -> list[dict]:
    """Each query's most helpful and harmful training examples from a gradient index (topk.jsonl), and the latency.

    Give the configs and the checkpoint that built the index, as for ``lit-attrib predict``: ``lit-attrib
    index-query -c configs/quickstart.yaml -c configs/index_quickstart.yaml --ckpt_path
    runs/quickstart/checkpoints/last.ckpt --queries <file.jsonl | generated.jsonl | loader name>``.

    Args:
        queries: the queries: a json/jsonl file of rows like the training data's (tokenized like it), a
            ``generated.jsonl`` written by ``GenerationWriter`` (its prompts and generated answers), or the
            name ``x`` of the datamodule's ``x_dataloader()`` (default ``query``: ``TextDataModule``'s
            ``query_split``).
        index: the index folder; default: the ``output_dir`` of the ``GradientIndexCallback`` in the config's
            ``trainer.callbacks`` (whose projection arguments must then match the index's).
        model: the LightningModule the index was built on: give the configs that built the index
            (``-c configs/quickstart.yaml -c configs/index_quickstart.yaml``) and its ``--ckpt_path``.
        data: the LightningDataModule the index was built over: it tokenizes the queries, and its predict
            set (the indexed examples) gives the training texts.
        ckpt_path: the checkpoint whose weights the index was built at (loaded by Lightning, as for
            ``lit-attrib predict``).
        top_k: helpful and harmful training examples listed per query.
        curvature: ``kfac`` (the projected K-FAC curvature stored with the index) or ``identity`` (plain
            inner products of the projected gradients).
        damping: ``λ`` of the K-FAC preconditioner; default ``0.1 · mean(Λ)`` per layer.
        per_layer: also write each hit's score split over the indexed layers (``layers``).
        approximate: search with FAISS (the ``faiss`` extra: ``pip install 'lit-attrib[faiss]'``) instead of
            streaming every row; built on first use and cached in ``<index>/approximate/``; the listed
            scores are exact, a hit outside the candidates can be missed.
        nprobe: approximate search: inverted lists visited per query (more: slower, higher recall).
        candidates: approximate search: rows scored exactly per query (default ``max(20 · top_k, 200)``).
        check_weights: refuse a model whose tracked weights differ from those the index was built at.
        output_dir: where ``topk.jsonl`` and ``query.json`` go; default ``<index>_query`` next to the index.
        threads: CPU threads of the query (``torch.set_num_threads``); default torch's (every core). On a
            machine that other jobs share, fewer threads (even 1) can be much faster.
        accelerator: where the queries' gradients are computed; default the config's
            ``trainer.accelerator``, else ``auto``.
        precision: Lightning precision of the queries' forward; default the config's ``trainer.precision``,
            else ``32-true``.
        trainer: the configs' trainer section: read for its ``GradientIndexCallback``, accelerator and
            precision only.
        seed_everything: the configs' global seed (the query pass draws nothing random).

    Returns:
        The rows written to ``topk.jsonl``.
    """
    import lightning

    from lit_attrib.index import GradientIndex

    problems = []
    if top_k < 1:
        problems.append(f"top_k must be at least 1; got {top_k}")
    if nprobe < 1:
        problems.append(f"nprobe must be at least 1; got {nprobe}")
    if threads is not None and threads < 1:
        problems.append(f"threads must be at least 1; got {threads}")
    if candidates is not None and candidates < top_k:
        problems.append(f"candidates must be at least top_k ({top_k}); got {candidates}")
    if model is None:
        problems.append("give the model the index was built on: -c the configs that built it (model: class_path ...)")
    if data is None:
        problems.append("give the data the index was built over: -c the configs that built it (data: class_path ...)")
    if problems:
        raise ConfigError(f"invalid {_OWNER} arguments:\n  - " + "\n  - ".join(problems))
    settings = dict(trainer or {})
    folder, built_with = _index_folder(index, settings.get("callbacks") or [])
    opened = GradientIndex(folder)  # a missing, empty or damaged index fails before the model is built
    if built_with is not None:
        opened.check_arguments(built_with)
    if threads is not None:
        torch.set_num_threads(threads)
    if isinstance(seed_everything, int) and not isinstance(seed_everything, bool):
        lightning.seed_everything(seed_everything, verbose=False)
    runner = _QueryPass(opened, queries, check_weights,
                        {"k": top_k, "curvature": curvature, "damping": damping, "per_layer": per_layer,
                         "approximate": approximate, "nprobe": nprobe, "candidates": candidates})
    quiet = _Without("limit_predict_batches")  # the one batch is ours, not the user's setting
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(quiet)
    try:
        runner_trainer = Trainer(
            accelerator=accelerator or settings.get("accelerator") or "auto", devices=1,
            precision=precision or settings.get("precision") or "32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_predict_batches=1, callbacks=[runner])
    finally:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").removeFilter(quiet)
    # The pass reads one batch of the predict set and predicts nothing: the callback does the work.
    ensure_predict_step(model, runner, force=True)
    quiet_known_noise("predict")  # e.g. the checkpoint's ModelCheckpoint state, of no use here
    try:
        runner_trainer.predict(model, datamodule=data, ckpt_path=ckpt_path, return_predictions=False)
    finally:
        release_predict_step(model, runner)
    if runner.rows is None:
        raise DataError(f"{_OWNER}: the predict pass ran no batch; the datamodule's predict set is empty")
    out = Path(output_dir) if output_dir else folder.parent / f"{folder.name}_query"
    out.mkdir(parents=True, exist_ok=True)
    (out / "query.json").unlink(missing_ok=True)  # an earlier run's must not vouch for the new rows
    write_jsonl(out / "topk.jsonl", runner.rows)
    timings = runner.timings
    result = runner.result
    write_json(out / "query.json", {  # last: it vouches for topk.jsonl
        "format": FORMAT, "index": str(folder), "queries": str(queries), "checkpoint": ckpt_path,
        "num_queries": len(runner.rows), "num_indexed": len(opened), "top_k": result.ids.shape[1],
        "curvature": curvature, "damping": damping, "method": result.method,
        "approximate": {"nprobe": nprobe, "candidates": candidates} if approximate else None,
        "seconds": timings, "layers": result.layers, "sign": SIGN,
        "index_metadata": {key: opened.metadata.get(key) for key in ("name", "global_step", "collection", "arguments")},
    })
    count = len(runner.rows)
    print(f"{_OWNER}: {count} queries against {len(opened)} indexed examples ({result.method} search, "
          f"{curvature} curvature, top {result.ids.shape[1]})\n"
          f"  read queries:    {timings['read_queries']:.3f} s\n"
          f"  query gradients: {timings['query_gradients']:.3f} s ({1e3 * timings['query_gradients'] / count:.2f} ms "
          f"per query)\n"
          + (f"  FAISS index:     {timings['approximate_index']:.3f} s (built once, then read from the index folder)\n"
             if "approximate_index" in timings else "")
          + f"  search:          {timings['search']:.4f} s ({1e3 * timings['search'] / count:.3f} ms per query)\n"
          f"  wrote {out / 'topk.jsonl'}")
    return runner.rows


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _index_folder(index: str | None, callbacks: list) -> tuple[Path, dict | None]:
    """The index folder, and the build arguments of the config's ``GradientIndexCallback`` (if any)."""
    from lit_attrib.callbacks import GradientIndexCallback

    found = [c for c in callbacks if isinstance(c, GradientIndexCallback)]
    found += [GradientIndexCallback(**(c.get("init_args") or {})) for c in callbacks
              if isinstance(c, dict) and str(c.get("class_path", "")).endswith("GradientIndexCallback")]
    if len(found) > 1:
        raise ConfigError(f"{_OWNER}: the config has {len(found)} GradientIndexCallbacks; name the index with --index")
    built_with = found[0].arguments() if found else None
    if index is not None:
        return Path(index), built_with
    if not found or not found[0].output_dir:
        raise ConfigError(f"{_OWNER}: name the index folder with --index (or give the config that built it, whose "
                          f"GradientIndexCallback has an output_dir)")
    return Path(found[0].output_dir), built_with


class _QueryPass(Callback):
    """Does the query inside a predict pass, once the model is built, restored and on its device."""

    def __init__(self, index: Any, queries: str, check_weights: bool, search: dict) -> None:
        self.index, self.queries, self.check_weights, self.search = index, queries, check_weights, search
        self.rows: list[dict] | None = None
        self.result = None
        self.timings: dict[str, float] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lit_attrib.callbacks._common import decode_texts
        from lit_attrib.engine.data import ExampleIds, iterate_batches, resolve_loader
        from lit_attrib.engine.task import resolve_task

        task = resolve_task(pl_module, None, owner=_OWNER)
        started = time.perf_counter()
        loader = resolve_loader(self.queries, trainer, pl_module, "the queries")
        read = time.perf_counter() - started
        texts: list[str] = []
        ids = ExampleIds(task, _OWNER)

        def batches():
            for position, batch in enumerate(iterate_batches(trainer, pl_module, loader)):
                if position == 0:
                    ids.check(loader, batch, trainer, "the queries")
                texts.extend(decode_texts(trainer, pl_module, task, batch))
                yield batch

        started = time.perf_counter()
        rows, query_ids = self.index.query_rows(pl_module, batches(), task=task, trainer=trainer,
                                                check_weights=self.check_weights)
        _synchronize(rows.device)
        gradients = time.perf_counter() - started
        if len(query_ids.unique()) != len(query_ids):
            raise DataError(f"{_OWNER}: the queries repeat example ids; each query needs its own (an 'index' column)")
        order = torch.argsort(query_ids)  # queries in dataset index order, as InfluenceCallback lists them
        rows, query_ids, texts = rows.cpu()[order], query_ids[order], [texts[i] for i in order.tolist()]
        started = time.perf_counter()
        if self.search["approximate"]:  # built once and cached: not part of a query's latency
            self.index.approximate_index()
        prepared = time.perf_counter() - started
        result = self.index.search(rows, **self.search)
        hits = set(result.ids.flatten().tolist()) | set(result.harmful_ids.flatten().tolist())
        train_texts = _training_texts(trainer, pl_module, task, sorted(hits))
        self.rows = [{"query_index": int(query_id), "query": texts[q],
                      "helpful": _entries(result, q, train_texts, harmful=False),
                      "harmful": _entries(result, q, train_texts, harmful=True)}
                     for q, query_id in enumerate(query_ids.tolist())]
        self.result = result
        self.timings = {"read_queries": read, "query_gradients": gradients, "search": result.seconds}
        if self.search["approximate"]:
            self.timings["approximate_index"] = prepared


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _entries(result: Any, q: int, texts: dict[int, str], harmful: bool) -> list[dict]:
    ids = result.harmful_ids if harmful else result.ids
    scores = result.harmful_scores if harmful else result.scores
    layers = result.harmful_layer_scores if harmful else result.layer_scores
    entries = []
    for j, (index, score) in enumerate(zip(ids[q].tolist(), scores[q].tolist())):
        entry = {"index": int(index), "score": float(score), "text": texts.get(int(index), "")}
        if layers is not None:
            entry["layers"] = {name: float(value) for name, value in zip(result.layers, layers[q, j].tolist())}
        entries.append(entry)
    return entries


def _training_texts(trainer: Trainer, pl_module: LightningModule, task: Any, wanted: list[int]) -> dict[int, str]:
    """The text of each indexed example in ``wanted``, from the predict set (the examples that were indexed),
    decoded as ``InfluenceCallback`` decodes them; examples the predict set lacks get none, with a warning."""
    from lit_attrib.callbacks._common import decode_texts
    from lit_attrib.engine.data import current_loader

    loader = current_loader(trainer, 0)
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not wanted:
        return {}
    if "index" in (getattr(dataset, "column_names", None) or []):
        position = {int(value): p for p, value in enumerate(dataset["index"])}
    else:
        position = {i: i for i in wanted if 0 <= i < len(dataset)}
    present = [i for i in wanted if i in position]
    texts: dict[int, str] = {}
    for start in range(0, len(present), 64):
        chunk = present[start:start + 64]
        batch = loader.collate_fn([dataset[position[i]] for i in chunk])
        known = task.example_ids(batch)
        decoded = decode_texts(trainer, pl_module, task, batch)
        for i, text, seen in zip(chunk, decoded, known.tolist() if known is not None else chunk):
            if int(seen) == i:
                texts[i] = text
    if missing := [i for i in wanted if i not in texts]:
        rank_zero_warn(f"{_OWNER}: {len(missing)} indexed example(s) (ids {missing[:8]}) are not in the datamodule's "
                       f"predict set, so their text is left empty: give the data config the index was built over")
    return texts
