"""InfluenceCallback: EKFAC influence of every training example on every query, in a ``predict`` pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lit_attrib.artifacts.scores import save_tensors
from lit_attrib.callbacks._scoring import FactorScoringCallback, markdown_cell, tensorboard_text
from lit_attrib.engine.data import DataSource, source_name
from lit_attrib.engine.task import LossFn, Task
from lit_attrib.errors import ConfigError, DataError, ModelError
from lit_attrib.io import write_json, write_jsonl
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.influence import LowRank, PairwiseScores, low_rank
from lit_attrib.ops.kfac import factors_inverse_hvp

__all__ = ["InfluenceCallback"]

FORMAT = "lit_attrib.scores/1"


class InfluenceCallback(FactorScoringCallback):
    """Influence ``I(z_q, z_m) = ∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)`` of each training example on each query.

    Run it in ``lit-attrib predict`` over the training set as whole examples (``TextDataModule``'s
    ``predict_split: train`` and ``predict_content: examples``). When the pass starts, it computes
    each query's gradient (queries from the datamodule's ``<queries>_dataloader()``, e.g.
    ``TextDataModule.query_dataloader``, which reads the validation split, a file of questions or a
    ``generated.jsonl`` of model answers) and preconditions it once with the saved EKFAC factors,
    ``P_q = (H + λI)⁻¹ ∇L(z_q)``, optionally cut to rank r. Each training batch is then scored from
    its layers' activations and output gradients (``Σ_t g_tᵀ P_q a_t``) in one backward pass.
    **Positive = the training example lowers the query's loss (helpful).**

    Writes ``scores.safetensors`` (``scores (N_query, N_train)`` in dataset index order, the
    indices, optionally ``token_scores (N_query, N_train, T)`` that sum over T to ``scores``),
    ``topk.jsonl`` (each query's ``top_k`` most helpful and most harmful training examples with
    their text) and ``scores.json``; the top-k also as a TensorBoard text table. Partial results are
    written every ``chunk_size`` examples, so a killed pass run again resumes where it stopped.

    Args:
        factors: folder of the EKFAC (or K-FAC) factors from ``KFACCollectorCallback``.
        queries: the queries: a datamodule loader's name (``<queries>_dataloader()``), a
            ``DataLoader``, a dataset, or a json/jsonl file (tokenized like the run's data).
        target_modules: fnmatch patterns of the layers to use; default every layer the factors hold.
        query_gradient_rank: cut each preconditioned query gradient to this rank (truncated SVD);
            ``null`` keeps full rank.
        expand_low_rank_gb: a rank-r query gradient is contracted through the tokens
            (``T·Q·r·(out + in)`` per example); where multiplying it back out to ``(Q, out, in)`` makes
            the contraction cheaper (``(T + Q)·out·in``), it is expanded, layer by layer, as long as the
            expanded layers take at most this many GB together. 0 never expands (least memory).
        damping: ``λ``; default ``0.1 · mean(Λ)`` per layer.
        top_k: helpful and harmful examples listed per query.
        token_scores: also keep each training token's share of the score.
        dtype: precision of the gradients and scores.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]``, each example's summed loss (shortcut for
            ``task=Task(loss_fn=...)``); not needed for lit_attrib's modules and wrapped Hugging Face models.
        task: what lit_attrib needs to know about the module's batches and loss
            (:class:`lit_attrib.engine.Task`): the loss, example ids, token masks.
        output_dir: artifact folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name (folder and TensorBoard tag).
        chunk_size: training examples per partial-results file.
        overwrite: replace scores in ``output_dir`` that were made with other arguments.
    """

    def __init__(
        self,
        factors: str,
        queries: DataSource = "query",
        target_modules: list[str] | None = None,
        query_gradient_rank: int | None = None,
        expand_low_rank_gb: float = 1.0,
        damping: float | None = None,
        top_k: int = 10,
        token_scores: bool = False,
        dtype: str = "float32",
        loss_fn: LossFn | None = None,
        output_dir: str | None = None,
        name: str = "influence",
        chunk_size: int = 256,
        overwrite: bool = False,
        task: Task | None = None,
    ) -> None:
        if query_gradient_rank is not None and query_gradient_rank < 1:
            raise ConfigError(f"query_gradient_rank must be at least 1 (or null for full rank); got {query_gradient_rank}")
        if expand_low_rank_gb < 0:
            raise ConfigError(f"expand_low_rank_gb must be non-negative; got {expand_low_rank_gb}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1; got {top_k}")
        super().__init__(factors, target_modules, damping, dtype, loss_fn, output_dir, name, chunk_size, overwrite,
                         task=task)
        self.queries = queries
        self.query_gradient_rank = query_gradient_rank
        self.top_k = top_k
        self.token_scores = token_scores
        self.expand_low_rank_gb = expand_low_rank_gb
        self.preconditioned: dict[str, torch.Tensor | LowRank] = {}
        self._scores: PairwiseScores | None = None
        self.query_indices = torch.empty(0, dtype=torch.long)
        self.query_texts: list[str] = []
        self._batch: dict[str, torch.Tensor] = {}

    def arguments(self) -> dict:
        return {**super().arguments(), "queries": source_name(self.queries), "query_gradient_rank": self.query_gradient_rank,
                "token_scores": self.token_scores}  # expand_low_rank_gb changes the speed, not the scores

    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        # Each batch of query gradients is preconditioned (and cut to rank r) as soon as it is known,
        # so that only one batch of full per-example gradients is ever held.
        parts, self.query_indices, self.query_texts, _ = self.example_gradients(
            trainer, pl_module, self.queries, "queries", per_example=self.precondition)
        self.preconditioned = {}
        self._scores = None
        order = torch.argsort(self.query_indices)  # queries in dataset index order, like the training examples
        if len(self.query_indices.unique()) != len(self.query_indices):
            raise DataError(f"{type(self).__name__}[{self.name}]: the queries repeat example ids; each query needs "
                            f"its own")
        self.query_indices = self.query_indices[order]
        self.query_texts = [self.query_texts[i] for i in order.tolist()] if self.query_texts else self.query_texts
        for name, batches in parts.items():
            device_order = order.to(batches[0][0].device if isinstance(batches[0], tuple) else batches[0].device)
            if self.query_gradient_rank is None:
                self.preconditioned[name] = torch.cat(batches)[device_order]
            else:
                self.preconditioned[name] = (torch.cat([b[0] for b in batches])[device_order],
                                             torch.cat([b[1] for b in batches])[device_order])
        rank_zero_info(f"{type(self).__name__}[{self.name}]: {len(self.query_indices)} query gradient(s) "
                       f"preconditioned over {len(self.layers)} layer(s)"
                       + (f", rank {self.query_gradient_rank}" if self.query_gradient_rank else ""))
        return {"queries": self.query_indices.tolist()}

    def prepared_tensors(self) -> list[torch.Tensor]:
        return [t for p in self.preconditioned.values() for t in (p if isinstance(p, tuple) else (p,))]

    def release(self) -> None:
        self.preconditioned = {}
        if self._scores is not None:  # keep what it decided (``expanded``), drop the query gradients
            self._scores.preconditioned = {}

    def precondition(self, layer: LayerInfo, gradients: torch.Tensor) -> torch.Tensor | LowRank:
        """``(H + λI)⁻¹ ∇L(z_q)`` of one layer for every query, cut to ``query_gradient_rank`` if set."""
        preconditioned = factors_inverse_hvp(self.factors[layer.name], gradients, self.damping)
        if self.query_gradient_rank is None:
            return preconditioned
        try:
            return low_rank(preconditioned, self.query_gradient_rank)
        except ValueError as exc:
            raise ModelError(f"layer '{layer.name}': {exc}") from None

    @property
    def expanded(self) -> list[str]:
        """The layers whose rank-r query gradients were multiplied back out (see ``expand_low_rank_gb``)."""
        return self._scores.expanded if self._scores is not None else []

    def score_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        if self._scores is None:
            self._scores = PairwiseScores(self.preconditioned, self.dtype, self.token_scores,
                                          self.expand_low_rank_gb * 2**30)
        self._scores.begin_batch()
        self.backward(trainer, pl_module, batch, self._scores.add)
        return self._scores.end_batch()

    def write(self, trainer: Trainer, folder: Path, indices: torch.Tensor, tensors: dict[str, torch.Tensor],
              texts: list[str], metadata: dict) -> None:
        scores = tensors["scores"].T.contiguous()  # (Q, N)
        out = {"scores": scores, "query_indices": self.query_indices, "train_indices": indices}
        if "token_scores" in tensors:
            out["token_scores"] = tensors["token_scores"].transpose(0, 1).contiguous()  # (Q, N, T)
        save_tensors(folder / "scores.safetensors", out, FORMAT)
        k = min(self.top_k, scores.shape[1])
        rows = []
        for q, query_index in enumerate(self.query_indices.tolist()):
            order = torch.argsort(scores[q], descending=True, stable=True)
            entry = lambda i: {"index": int(indices[i]), "score": float(scores[q, i]), "text": texts[i]}  # noqa: E731
            rows.append({"query_index": query_index, "query": self.query_texts[q],
                         "helpful": [entry(i) for i in order[:k].tolist()],
                         "harmful": [entry(i) for i in order.flip(0)[:k].tolist()]})
        write_jsonl(folder / "topk.jsonl", rows)
        write_json(folder / "scores.json", {
            "format": FORMAT, **metadata, "num_queries": scores.shape[0], "num_train": scores.shape[1],
            "sign": "positive = the training example lowers the query's loss (helpful)",
        })
        tensorboard_text(trainer, f"{self.name}/top_{k}", self._markdown(rows[:50], k))
        rank_zero_info(f"{type(self).__name__}[{self.name}]: scores of {scores.shape[0]} queries × {scores.shape[1]} "
                       f"training examples written to {folder}")

    @staticmethod
    def _markdown(rows: list[dict], k: int) -> str:
        lines = ["| query | rank | helpful (score) | harmful (score) |", "|---|---|---|---|"]
        for row in rows:
            for rank, (good, bad) in enumerate(zip(row["helpful"], row["harmful"]), start=1):
                query = f"#{row['query_index']} {markdown_cell(row['query'])}" if rank == 1 else ""
                lines.append(f"| {query} | {rank} | #{good['index']} {markdown_cell(good['text'], 80)} ({good['score']:.3g}) "
                             f"| #{bad['index']} {markdown_cell(bad['text'], 80)} ({bad['score']:.3g}) |")
        return "\n".join(lines)
