"""TokenInfluenceCallback: differential token-wise influence (seed 000), one JVP pass per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_attrib.artifacts.scores import save_tensors
from lit_attrib.callbacks._scoring import FactorScoringCallback, markdown_cell, tensorboard_text
from lit_attrib.engine.data import DataSource, source_name
from lit_attrib.engine.gradient_pass import check_loss_shape, clone_batch
from lit_attrib.engine.task import LossFn, Task, function_name
from lit_attrib.io import atomic_open, write_json
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import factors_inverse_hvp

__all__ = ["TokenInfluenceCallback"]

FORMAT = "lit_attrib.token_scores/1"


class _TokenLoss(nn.Module):
    """``token_loss_fn(pl_module, batch)`` as a module, so that ``torch.func.functional_call`` can swap
    the tracked parameters for dual tensors."""

    def __init__(self, pl_module: LightningModule, task: Task) -> None:
        super().__init__()
        self.pl_module = pl_module
        self.task = task

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.token_loss(self.pl_module, batch)


class TokenInfluenceCallback(FactorScoringCallback):
    """Score every token of every query against a direction in parameter space (seed 000).

    ``d = mean_{positive} ∇L − mean_{negative} ∇L`` (by default the datamodule's ``forget`` minus
    ``retain`` loaders; ``negative: null`` uses the positive set alone), ``v = (H + λI)⁻¹ d`` with the
    saved factors, and ``S_ij = vᵀ ∇θ L(x_ij)`` for token j of query i over the tracked layers'
    parameters. Since ``S_i· = ∂/∂ε L_i·(θ + ε v)``, a batch's scores come from one forward-mode (JVP)
    pass, not one backward pass per token. Tokens that carry no loss (prompt, padding) are masked.
    ``Σ_j S_ij = vᵀ ∇L_i``, the sequence-level score along the same direction.

    The queries are ``predict``'s batches (whole examples: ``predict_content: examples``). Writes
    ``token_scores.safetensors`` (``scores (N_query, T)``, ``mask``, ``input_ids``,
    ``query_indices``, in dataset index order), ``token_scores.html`` (each query's tokens coloured
    by score; hover for the value) and ``token_scores.json``; the top-scoring tokens go to
    TensorBoard text.

    Args:
        factors: folder of the EKFAC (or K-FAC) factors from ``KFACCollectorCallback``.
        positive: datamodule loader whose mean gradient is ``d``'s first term: ``<positive>_dataloader()``.
        negative: loader whose mean gradient is subtracted; ``null`` for none.
        target_modules: fnmatch patterns of the layers to use; default every layer the factors hold.
        damping: ``λ``; default ``0.1 · mean(Λ)`` per layer.
        dtype: precision of the direction.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]`` for the mean gradients (default: the sum of
            ``token_loss_fn``); not needed for lit_attrib's modules and wrapped Hugging Face models.
        token_loss_fn: ``token_loss_fn(pl_module, batch) -> Tensor[B, T]``, each token's loss, 0 where
            none is taken.
        task: what lit_attrib needs to know about the module's batches and loss
            (:class:`lit_attrib.engine.Task`); its ``token_mask`` says which tokens are shown.
        top_tokens: tokens listed in TensorBoard (highest scores over all queries).
        output_dir: artifact folder; default ``<trainer.log_dir>/<name>``.
        name: the artifact's name (folder and TensorBoard tag).
        chunk_size: queries per partial-results file.
        overwrite: replace scores in ``output_dir`` that were made with other arguments.
    """

    tensors_file = "token_scores.safetensors"
    metadata_file = "token_scores.json"
    needs_texts = False
    needs = ("loss", "token_loss")

    def __init__(
        self,
        factors: str,
        positive: DataSource = "forget",
        negative: DataSource | None = "retain",
        target_modules: list[str] | None = None,
        damping: float | None = None,
        dtype: str = "float32",
        loss_fn: LossFn | None = None,
        token_loss_fn: LossFn | None = None,
        top_tokens: int = 30,
        output_dir: str | None = None,
        name: str = "token_influence",
        chunk_size: int = 256,
        overwrite: bool = False,
        task: Task | None = None,
    ) -> None:
        super().__init__(factors, target_modules, damping, dtype, loss_fn, output_dir, name, chunk_size, overwrite,
                         task=task, token_loss_fn=token_loss_fn)
        self.positive = positive
        self.negative = negative
        self.top_tokens = top_tokens
        self.direction: dict[str, torch.Tensor] = {}
        self.tangents: dict[str, torch.Tensor] = {}
        self._loss_module: _TokenLoss | None = None

    def _labels(self) -> tuple[str, str | None]:
        """How the two sets are named in logs and metadata: their loader names or paths, else by role."""
        def label(source, role):
            return None if source is None else source if isinstance(source, str) else f"{role} ({source_name(source)})"

        return label(self.positive, "positive"), label(self.negative, "negative")

    def arguments(self) -> dict:
        return {**super().arguments(), "positive": source_name(self.positive),
                "negative": None if self.negative is None else source_name(self.negative),
                "token_loss_fn": function_name(self.token_loss_fn)}

    # ---------------------------------------------------------------------- direction
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        positive, negative = self._labels()
        sets = [(self.positive, 1.0, positive)] + ([(self.negative, -1.0, negative)] if self.negative is not None else [])
        direction: dict[str, torch.Tensor] = {}
        counts = {}
        for source, sign, label in sets:
            sums, _, _, count = self.example_gradients(trainer, pl_module, source, f"{label} examples", shard=True)
            counts[label] = count
            for name, total in sums.items():
                direction[name] = direction.get(name, 0) + sign * total / count
        self.direction = direction
        self._loss_module = _TokenLoss(pl_module, self._task)
        self.tangents = {}
        for name, layer in self.layers.items():
            v = factors_inverse_hvp(self.factors[name], direction[name], self.damping)
            self.tangents.update(self._as_parameters(layer, v))
        rank_zero_info(f"{type(self).__name__}[{self.name}]: direction from "
                       + " minus ".join(f"{n} ({c} examples)" for n, c in counts.items()))
        return {"counts": counts}

    @staticmethod
    def _as_parameters(layer: LayerInfo, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bias-appended ``(out, in)`` vector as tangents of the layer's ``weight`` and ``bias``."""
        weight = vector[:, : layer.in_features]
        module = layer.module
        tangents = {f"pl_module.{layer.name}.weight": (weight if layer.kind == "linear" else weight.T)
                    .to(module.weight.dtype).contiguous()}
        if layer.has_bias:
            tangents[f"pl_module.{layer.name}.bias"] = vector[:, -1].to(module.bias.dtype).contiguous()
        return tangents

    def prepared_tensors(self) -> list[torch.Tensor]:
        return list(self.tangents.values())

    def release(self) -> None:
        # v stays readable (on the CPU) after the pass, as the tangents of the tracked parameters.
        self.tangents = {key: value.cpu() for key, value in self.tangents.items()}
        self.direction, self._loss_module = {}, None

    # ------------------------------------------------------------------------ scoring
    def score_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                    indices: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.token_scores(trainer, pl_module, batch)
        mask = self._task.token_mask(batch)
        mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(scores.device)
        ids = self._task.input_ids(batch)
        ids = torch.zeros_like(scores, dtype=torch.long) if ids is None or ids.shape != scores.shape else ids
        attention = self._task.padding_mask(batch)
        attention = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention
        return {"scores": scores.masked_fill(~mask, 0.0), "mask": mask.to(torch.uint8),
                "input_ids": ids, "attention_mask": attention.to(torch.uint8)}

    def token_scores(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> torch.Tensor:
        """``S[b, t] = vᵀ ∇θ L(x_bt)`` by one JVP through ``token_loss_fn``, ``(B, T)``."""
        module = self._loss_module
        # get_parameter, not named_parameters(): that drops tied weights (a GPT-2 lm_head is wte's).
        primals = {key: module.get_parameter(key).detach() for key in self.tangents}

        def losses(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
            # tie_weights=False: a tracked weight shared with another layer (GPT-2's lm_head and wte) moves
            # only in the tracked layer's use, as the factors, the direction and the influence see it.
            return torch.func.functional_call(module, parameters, (batch,), strict=False, tie_weights=False)

        # Forward-mode AD has no fused attention kernel: the math one computes the same attention.
        with torch.inference_mode(False), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), \
                trainer.precision_plugin.forward_context():
            batch = clone_batch(batch)
            values, tangent = torch.func.jvp(losses, (primals,), (self.tangents,))
        ids = self._task.input_ids(batch)
        length = ids.shape[1] if ids is not None and ids.ndim == 2 else values.shape[-1]
        check_loss_shape(values, (self._task.batch_size(batch), length),
                         "token_loss_fn (the loss of each token, 0 where none is taken)")
        return tangent.to(self.dtype)

    # ------------------------------------------------------------------------ writing
    def write(self, trainer: Trainer, folder: Path, indices: torch.Tensor, tensors: dict[str, torch.Tensor],
              texts: list[str], metadata: dict) -> None:
        from lit_attrib.reports import token_scores_html

        scores, mask, input_ids = tensors["scores"], tensors["mask"].bool(), tensors["input_ids"]
        attention = tensors["attention_mask"].bool()
        save_tensors(folder / self.tensors_file, {"scores": scores, "mask": mask, "input_ids": input_ids,
                                                  "attention_mask": attention, "query_indices": indices}, FORMAT)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) or getattr(trainer.lightning_module, "tokenizer", None)
        tokens = _token_strings(tokenizer, input_ids, attention)
        positive, negative = self._labels()
        title = f"{self.name}: d = mean ∇L({positive})" + (f" − mean ∇L({negative})" if negative else "")
        html = token_scores_html(tokens, scores, mask, indices.tolist(), title=title)
        with atomic_open(folder / "token_scores.html") as handle:
            handle.write(html)
        top = self._top_tokens(tokens, scores, mask, indices)
        write_json(folder / self.metadata_file, {
            "format": FORMAT, **metadata, "num_queries": scores.shape[0], "max_length": scores.shape[1],
            "positive": positive, "negative": negative, "top_tokens": top,
            "sign": "S_ij = vᵀ∇L(x_ij): positive = moving along v = H⁻¹d raises the token's loss",
        })
        lines = ["| rank | query | position | token | score |", "|---|---|---|---|---|"]
        lines += [f"| {r} | #{t['query_index']} | {t['position']} | `{markdown_cell(t['token'], 40)}` | {t['score']:.4g} |"
                  for r, t in enumerate(top, start=1)]
        tensorboard_text(trainer, f"{self.name}/top_tokens", "\n".join(lines))
        rank_zero_info(f"{type(self).__name__}[{self.name}]: token scores of {scores.shape[0]} queries written to "
                       f"{folder} (open {folder / 'token_scores.html'})")

    def _top_tokens(self, tokens: list[list[str]], scores: torch.Tensor, mask: torch.Tensor,
                    indices: torch.Tensor) -> list[dict]:
        flat = scores.masked_fill(~mask, float("-inf")).flatten()
        count = min(self.top_tokens, int(mask.sum()))
        top = torch.topk(flat, count).indices.tolist() if count else []
        width = scores.shape[1]
        return [{"query_index": int(indices[i // width]), "position": i % width, "token": tokens[i // width][i % width],
                 "score": float(flat[i])} for i in top]


def _token_strings(tokenizer, input_ids: torch.Tensor, keep: torch.Tensor) -> list[list[str]]:
    """Each token as the text it stands for (spaces kept), ``""`` past a row's end."""
    rows = []
    for ids, present in zip(input_ids.tolist(), keep.tolist()):
        if tokenizer is None:
            rows.append([str(i) if p else "" for i, p in zip(ids, present)])
        else:
            rows.append([tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]) if p else ""
                         for i, p in zip(ids, present)])
    return rows
