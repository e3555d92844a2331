"""AttentionCaptureCallback: the true attention maps of Llama-family models, differential ones included.

Seed 004 compares where DiffLlama and Llama put their attention on GSM8K problems with injected
noise. transformers' DiffLlama returns the first plain softmax map from ``output_attentions``, not
the differential one, and the default SDPA kernel returns no map at all. This callback captures
the maps the model really uses, under its configured attention implementation, without touching
transformers' source:

- under ``eager`` the kernel's own weights (the module's second output) are used;
- under SDPA / flash attention, which return none, the map is recomputed from exactly the tensors
  the kernel received (queries and keys after RoPE and norms, the mask, the scaling), for the
  selected heads and query positions only (:func:`lit_attrib.ops.attention.attention_probabilities`);
- for DiffLlama the map is ``D = A_i − λ·A_{i+H/2}`` per differential head, ``λ`` from the layer's
  parameters, never clamped (rows sum to ``1 − λ``).

The kernel still computes the output as before: logits, and generation with the KV cache, are the
same with and without the callback. Only the first forward of each batch is captured (the prompt's
prefill when a module generates from its batch, as ``CausalLMModule`` does in predict); it must see
the batch as the data module gave it, which rules out modules that rebuild their inputs
(``EvalModule`` re-pads prompts, and scores item×choice rows).

The callback says when and where; the math is elsewhere: model recognition and the kernel registry
in :mod:`lit_attrib.callbacks.attention_kernels`, maps in :mod:`lit_attrib.ops.attention`, the
allocation sums in :class:`lit_attrib.ops.attention_allocation.AttentionAllocation`, and the files in
:mod:`lit_attrib.artifacts.attention`.
"""

from __future__ import annotations

import contextlib
import heapq
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_attrib.artifacts.attention import FORMAT, METADATA_FILE, load_attention, save_attention
from lit_attrib.callbacks._common import ArtifactCallback
from lit_attrib.callbacks._scoring import tensorboard_text
from lit_attrib.callbacks.attention_kernels import attention_modules, capture_kernel_inputs
from lit_attrib.engine.data import ExampleIds, current_loader, require_one_loader
from lit_attrib.engine.task import Task, resolve_task
from lit_attrib.engine.tracking import exclusive, observed_by
from lit_attrib.errors import DataError, ModelError
from lit_attrib.io import atomic_path, write_json
from lit_attrib.ops.attention import (
    attention_probabilities,
    differential_lambda,
    differential_map,
    is_differential,
)
from lit_attrib.ops.attention_allocation import PARTS, AttentionAllocation

# attention_modules, capture_kernel_inputs and load_attention are re-exported for existing imports
__all__ = ["AttentionCaptureCallback", "attention_modules", "capture_kernel_inputs", "load_attention"]

DEFAULT_CLASSES = ("other", "math", "noise")

class AttentionCaptureCallback(ArtifactCallback):
    """Capture attention maps in ``validate``, ``test`` or ``predict`` and measure where their mass goes.

    For each selected layer and head, the **attention allocation ratio** is the share of the mass that
    the selected query positions put on each class of key tokens: key math information, the injected
    noise span, and other tokens (classes from the batch's ``token_class``, which
    :class:`~lit_attrib.data.NoisyGSM8KDataModule` derives from its recorded character spans; names
    from the datamodule's ``token_classes``). Masses are summed over all queries of all examples of
    the pass, then divided: the ratios of a layer and head sum to 1. For differential maps, the
    signed mass, the positive part's and the negative part's are reported separately (each sums to 1).

    Writes, on rank zero, into ``output_dir`` (default ``<trainer.log_dir>/<name>``):

    - ``attention.safetensors``: the maps of the ``max_examples`` examples with the smallest dataset
      indices (``<index>/layer<L>``: ``(heads, queries, keys)`` float32 over the example's real
      tokens; ``<index>/input_ids``, ``<index>/queries``, ``<index>/token_class``), ``lambda``
      per layer, and the summed ``mass`` ``(3, layers, heads, classes)`` (signed, positive, negative);
    - ``allocation.json``: arguments, model, layers, heads, classes, λ per layer, the ratios per
      layer and head, counts, and which examples the maps hold;
    - ``allocation.md``: the summary table (also in TensorBoard), ``plots/*.png`` heatmaps with the
      tokens on the axes (also in TensorBoard); λ per layer is logged as ``<name>/lambda/layer<L>``.

    Args:
        layers: layer indices (default: all).
        heads: head indices (default: all); for a differential model these are the ``H/2``
            differential heads.
        queries: which query positions: ``answer`` (the tokens with labels: the answer of a QA
            example and its end-of-sequence token; the prompt's last token, which writes the first
            answer token, is not among them), ``last`` (each row's last real token: the position that writes the first
            answer token of a prompt), ``all`` (every real token), or a list of positions counted
            from each row's first real token (negative: from its end).
        max_examples: how many examples' maps are kept (those with the smallest dataset indices; the
            ratios use every example of the pass).
        plot_examples: how many of the kept examples get heatmaps.
        output_dir: artifact folder.
        name: the artifact's name.
        overwrite: replace results made with other arguments.
        task: how to read token ids, example ids, padding and answer tokens from a batch
            (:class:`lit_attrib.engine.Task`); detected for Hugging Face-style dict batches.
    """

    metadata_file = METADATA_FILE

    def __init__(
        self,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        queries: Literal["answer", "last", "all"] | list[int] = "answer",
        max_examples: int = 8,
        plot_examples: int = 2,
        output_dir: str | None = None,
        name: str = "attention",
        overwrite: bool = False,
        task: Task | None = None,
    ) -> None:
        if isinstance(queries, str) and queries not in ("answer", "last", "all"):
            raise ModelError(f"queries must be 'answer', 'last', 'all' or a list of positions; got {queries!r}")
        if max_examples < 0 or plot_examples < 0:
            raise ModelError(f"max_examples and plot_examples must be >= 0; got {max_examples}, {plot_examples}")
        self.layers = None if layers is None else [int(i) for i in layers]
        self.heads = None if heads is None else [int(i) for i in heads]
        self.queries = queries if isinstance(queries, str) else [int(i) for i in queries]
        self.max_examples = max_examples
        self.plot_examples = plot_examples
        self.output_dir = output_dir
        self.name = name
        self.overwrite = overwrite
        self.task = task
        self._task: Task | None = None
        self._modules: dict[nn.Module, int] = {}
        self._handles: list = []

    def arguments(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "queries": self.queries, "max_examples": self.max_examples}

    # --------------------------------------------------------------------------------- setup
    def _resolve(self, pl_module: LightningModule) -> None:
        found = attention_modules(pl_module)
        if not found:
            kinds = sorted({type(m).__name__ for _, m in pl_module.named_modules() if "attn" in type(m).__name__.lower()
                            or "attention" in type(m).__name__.lower()})
            raise ModelError(
                f"AttentionCaptureCallback found no attention module it recognises in {type(pl_module).__name__} "
                f"(it needs Llama-family attention: q_proj, k_proj, v_proj, o_proj and head_dim; this model has "
                f"{kinds or 'no attention modules'}). Supported: Llama, DiffLlama, Mistral, Qwen2/3, OLMo-2 and kin")
        total = len(found)
        layers = list(range(total)) if self.layers is None else self.layers
        bad = [i for i in layers if not 0 <= i < total]
        if bad:
            raise ModelError(f"layers {bad} out of range: the model has {total} attention layers, valid are "
                             f"0..{total - 1}")
        module = found[0][1]
        config = module.config
        self._differential = is_differential(module)
        num_heads = config.num_attention_heads
        available = num_heads // 2 if self._differential else num_heads
        heads = list(range(available)) if self.heads is None else self.heads
        bad = [h for h in heads if not 0 <= h < available]
        if bad:
            kind = "differential heads (half of num_attention_heads)" if self._differential else "heads"
            raise ModelError(f"heads {bad} out of range: the model has {available} {kind}, valid are "
                             f"0..{available - 1}")
        self._layers, self._heads = layers, heads
        self._modules = {found[i][1]: i for i in layers}
        self._num_heads = num_heads
        self._implementation = getattr(config, "_attn_implementation", None) or "eager"
        self._model_type = getattr(config, "model_type", type(module).__name__)
        # heads whose softmax maps are needed: a differential head i also needs i + H/2
        self._needed = heads + [h + num_heads // 2 for h in heads] if self._differential else heads

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve(pl_module)
        owner = f"{type(self).__name__}[{self.name}]"
        self._task = resolve_task(pl_module, self.task, owner=owner, needs=())
        self._ids = ExampleIds(self._task, owner)
        require_one_loader(trainer, owner)
        # every process asks for the folder (trainer.log_dir is a collective); refuse before the pass, not after
        self._folder = self.folder(trainer)
        self.check_overwrite(trainer)
        names = getattr(trainer.datamodule, "token_classes", None) if trainer.datamodule is not None else None
        self._classes = tuple(names) if names else DEFAULT_CLASSES
        self._allocation = AttentionAllocation(len(self._layers), len(self._heads), len(self._classes))
        self._examples: dict[int, dict] = {}  # dataset index -> kept maps
        self._heap: list[int] = []  # max-heap (negated) of the kept indices
        self._lambdas = {layer: differential_lambda(m) for m, layer in self._modules.items()} if self._differential \
            else {}
        self._batch: dict | None = None
        self._classified = False  # whether any batch carried token classes (else the allocation is all "other")
        self._rows_seen = 0
        self._kernel_inputs: dict[nn.Module, tuple] = {}
        self._handles = []
        for module in self._modules:
            self._handles.append(module.register_forward_hook(self._after_forward, with_kwargs=True))
        self._stack = contextlib.ExitStack()
        if self._implementation != "eager":
            self._stack.enter_context(capture_kernel_inputs(self._implementation, self._record_kernel))
        if self._lambdas and trainer.logger is not None and trainer.is_global_zero:
            values = {f"{self.name}/lambda/layer{layer}": lam for layer, lam in self._lambdas.items()}
            trainer.logger.log_metrics(values, step=trainer.global_step)

    def _stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.close()
        self._batch = None

    # ------------------------------------------------------------------------------- capture
    def _batch_start(self, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        task = self._task
        if batch_idx == 0:  # rows without ids are numbered in loader order: refuse where that would be wrong
            self._ids.check(current_loader(trainer, dataloader_idx), batch, trainer, "the captured examples",
                            sharded=True)
        ids = task.input_ids(batch)
        if ids is None:
            raise DataError("AttentionCaptureCallback needs token ids in each batch (dict batches with input_ids, or a "
                            "Task with input_ids=f(batch))")
        mask = task.padding_mask(batch)
        mask = torch.ones_like(ids) if mask is None else mask.long()
        token_class = task.column(batch, "token_class")
        if token_class is None:
            token_class = torch.where(mask.bool(), 0, -1)  # everything is "other"
        else:
            self._classified = True
        index = task.example_ids(batch)
        if index is None:  # number the rows in the order seen (a loader without dataset indices)
            index = torch.arange(self._rows_seen, self._rows_seen + ids.shape[0])
        self._rows_seen += ids.shape[0]
        answers = task.answer_mask(batch) if self.queries == "answer" else None
        if self.queries == "answer" and answers is None:
            raise DataError("queries='answer' needs batches with labels (whole QA examples); use queries: last or "
                            "all for prompt-only batches (or predict_content: examples)")
        positions = [self._query_positions(row, mask[row], answers, int(index[row])) for row in range(ids.shape[0])]
        self._batch = {"mask": mask, "token_class": token_class, "positions": positions,
                       "index": [int(i) for i in index.tolist()], "ids": ids, "pending": set(self._modules)}
        self._allocation.begin_batch()

    def _query_positions(self, row: int, mask: torch.Tensor, answers: torch.Tensor | None, index: int) -> torch.Tensor:
        real = mask.nonzero().squeeze(-1)
        if self.queries == "answer":
            return answers[row].nonzero().squeeze(-1).to(real.device)
        if self.queries == "last":
            return real[-1:]
        if self.queries == "all":
            return real
        count = real.shape[0]
        bad = [p for p in self.queries if not -count <= p < count]
        if bad:
            raise DataError(f"query positions {bad} are outside the example at dataset index {index} ({count} real "
                            f"tokens; valid are {-count}..{count - 1}); positions count from each example's first real "
                            f"token")
        return real[torch.as_tensor(self.queries, device=real.device)]

    def _record_kernel(self, module, query, key, attention_mask, kwargs, weights) -> None:
        # DiffLlama calls the kernel twice with the same queries and keys: the first call is enough
        if self._batch is not None and module in self._batch["pending"] and module not in self._kernel_inputs \
                and observed_by(self):
            extra = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
            if extra and weights is None:
                raise ModelError(f"the '{self._implementation}' kernel of attention layer {self._modules[module]} uses "
                                 f"{extra}, which the recomputed maps do not model; capture with "
                                 f"attn_implementation: eager (the kernel's own weights are then used)")
            self._kernel_inputs[module] = (query, key, attention_mask, kwargs.get("scaling", module.scaling), weights)

    def _after_forward(self, module: nn.Module, args, kwargs, output) -> None:
        captured = self._batch  # this batch's capture state (not the data batch)
        if captured is None or module not in captured["pending"] or not observed_by(self):
            return
        captured["pending"].discard(module)
        kernel = self._kernel_inputs.pop(module, None)
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None and kernel is not None:
            weights = kernel[4]
        layer = self._modules[module]
        position = self._layers.index(layer)
        with torch.no_grad():
            for row, index in enumerate(captured["index"]):
                queries = captured["positions"][row]
                if queries.numel() == 0:
                    continue
                if weights is not None:
                    keys = weights.shape[-1]
                    probabilities = weights[row].index_select(0, torch.as_tensor(self._needed, device=weights.device))
                    probabilities = probabilities[:, queries].float()
                elif kernel is not None:
                    query, key, mask, scaling, _ = kernel
                    keys = key.shape[-2]
                    probabilities = attention_probabilities(
                        query[row], key[row], None if mask is None else mask[row], scaling, self._needed, queries,
                        causal=getattr(module, "is_causal", True))
                else:
                    raise ModelError(f"attention layer {layer} ({type(module).__name__}) returned no weights and its "
                                     f"kernel '{self._implementation}' was not seen; set attn_implementation to "
                                     f"eager or sdpa")
                if keys != captured["mask"].shape[1]:
                    raise DataError("AttentionCaptureCallback captures a batch's first forward, which must be the "
                                    f"batch itself ({captured['mask'].shape[1]} tokens) but saw {keys} keys: the module "
                                    "rebuilt its inputs (e.g. EvalModule re-pads prompts for generation) or reused a "
                                    "KV cache. Capture with CausalLMModule (validate: whole examples; predict: "
                                    "prompts, generation included)")
                # the needed heads are the differential heads, then their partners: D = A_i − λ·A_{i+H/2}
                maps = differential_map(probabilities, self._lambdas[layer]) if self._differential else probabilities
                key_class = captured["token_class"][row].to(maps.device)
                self._allocation.add(position, maps, key_class)
                if self._keep(index):
                    real = captured["mask"][row].bool()
                    first = int(real.nonzero()[0])
                    example = self._examples.setdefault(index, {
                        "input_ids": captured["ids"][row][real].cpu(), "queries": (queries - first).cpu(),
                        "token_class": key_class[real].cpu(), "maps": {}})
                    example["maps"][layer] = maps[..., real].cpu().contiguous()

    def _keep(self, index: int) -> bool:
        """Whether ``index`` is among the ``max_examples`` smallest seen so far (evicting the largest)."""
        if index in self._examples:
            return True
        if self.max_examples == 0:
            return False
        if len(self._heap) < self.max_examples:
            heapq.heappush(self._heap, -index)
            return True
        if index < -self._heap[0]:
            evicted = -heapq.heapreplace(self._heap, -index)
            self._examples.pop(evicted, None)
            return True
        return False

    def _batch_end(self) -> None:
        if self._batch is not None and self._batch["pending"]:
            missing = sorted(self._modules[m] for m in self._batch["pending"])
            rank_zero_warn(f"AttentionCaptureCallback: layers {missing} ran no forward in this batch")
        self._batch = None
        self._kernel_inputs.clear()
        self._allocation.end_batch()

    # ---------------------------------------------------------------------------------- end
    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        examples = self._examples
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            self._allocation.reduce(lambda tensor: sum(_gather(tensor, trainer.world_size)))
            examples = {index: example for part in _gather(examples, trainer.world_size)
                        for index, example in part.items()}
        if not trainer.is_global_zero:
            return
        kept = sorted(examples)[: self.max_examples]
        examples = {index: examples[index] for index in kept}
        self._write(trainer, pl_module, self._allocation, examples)

    def _ratios(self, allocation: AttentionAllocation) -> dict:
        """Per part, layer and head: each class's share (``None`` where a part has no mass)."""
        ratios, pooled = allocation.shares(), allocation.pooled_shares()  # pooled: heads together
        result = {}
        for p, part in enumerate(PARTS if self._differential else PARTS[:1]):
            result[part] = {
                str(layer): {str(head): {c: _number(ratios[p, i, j, k]) for k, c in enumerate(self._classes)}
                             for j, head in enumerate(self._heads)}
                for i, layer in enumerate(self._layers)}
            result[part + "_mean_over_heads"] = {
                str(layer): {c: _number(pooled[p, i, k]) for k, c in enumerate(self._classes)}
                for i, layer in enumerate(self._layers)}
        return result

    def summary_table(self, ratios: dict) -> str:
        """Markdown: one row per layer (heads pooled), the share of each class per part."""
        parts = [p for p in PARTS if p + "_mean_over_heads" in ratios]
        header = ["layer"] + (["λ"] if self._differential else []) + [
            f"{c} ({p})" if len(parts) > 1 else c for p in parts for c in self._classes]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in self._layers:
            cells = [str(layer)] + ([f"{self._lambdas[layer]:.3f}"] if self._differential else [])
            for p in parts:
                cells += [_percent(ratios[p + "_mean_over_heads"][str(layer)][c]) for c in self._classes]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _write(self, trainer: Trainer, pl_module: LightningModule, allocation: AttentionAllocation,
               examples: dict) -> None:
        folder, seen = self._folder, allocation.queries
        lambdas = [self._lambdas[layer] for layer in self._layers] if self._lambdas else None
        save_attention(folder, allocation.mass, seen, lambdas, examples)
        ratios = self._ratios(allocation)
        table = self.summary_table(ratios)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        figures = self._plots(folder, examples, tokenizer, trainer)
        metadata = {
            "format": FORMAT, "arguments": self.arguments(), "model_type": self._model_type,
            "attn_implementation": self._implementation, "differential": self._differential,
            "layers": self._layers, "heads": self._heads, "classes": list(self._classes),
            "lambda": {str(layer): lam for layer, lam in self._lambdas.items()},
            "queries_per_layer": {str(layer): int(seen[i]) for i, layer in enumerate(self._layers)},
            "examples": sorted(examples), "ratios": ratios, "plots": [p.name for p in figures],
        }
        with atomic_path(folder / "allocation.md") as tmp:
            Path(tmp).write_text(f"# Attention allocation ({self._model_type})\n\n{table}\n")
        write_json(folder / self.metadata_file, metadata)
        queries = f"{int(seen[0]) if len(seen) else 0} queries per layer"
        if not self._classified:  # one class only: a table of 100 % "other" says nothing
            rank_zero_info(f"AttentionCaptureCallback: maps of {len(examples)} examples ({self._model_type}, {queries}) "
                           f"written to {folder}; no batch carried token classes (`token_class`, as "
                           f"NoisyGSM8KDataModule's do), so there is no allocation table to show")
            return
        tensorboard_text(trainer, f"{self.name}/allocation", table)
        rank_zero_info(f"AttentionCaptureCallback: attention allocation ({self._model_type}, {queries}), "
                       f"written to {folder}\n{table}")

    def _plots(self, folder: Path, examples: dict, tokenizer, trainer: Trainer) -> list[Path]:
        from lit_attrib.plotting import attention_figure, plt

        writer = getattr(trainer.logger, "experiment", None)
        written = []
        for index in list(examples)[: self.plot_examples]:
            example = examples[index]
            figure = attention_figure(example, tokens=_tokens(tokenizer, example["input_ids"]),
                                      title=f"{self._model_type}: example {index}", differential=self._differential,
                                      lambdas=self._lambdas)
            path = folder / "plots" / f"example{index}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=110)
            written.append(path)
            if writer is not None and hasattr(writer, "add_figure"):
                writer.add_figure(f"{self.name}/example{index}", figure, global_step=trainer.global_step, close=False)
            plt.close(figure)
        return written

    # --------------------------------------------------------------------------------- hooks
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the validation loops inside fit
            self._start(trainer, pl_module)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._handles:
            self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._handles:
            self._batch_end()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handles:
            self._finish(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end()

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # No attention layer ran: the predict_step is a lent no-op, or one that skips whole examples
        # (CausalLMModule in an analysis pass). Run the forward to watch.
        if self._batch is not None and len(self._batch["pending"]) == len(self._modules):
            with torch.no_grad(), exclusive(self):
                self._task.forward(pl_module, batch)
        self._batch_end()

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._handles:
            self._stop()  # hooks and the kernel registry back as they were; nothing half-written


def _number(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if value != value else value


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _tokens(tokenizer, ids: torch.Tensor) -> list[str] | None:
    if tokenizer is None:
        return None
    return [tokenizer.decode([int(i)]) for i in ids.tolist()]


def _gather(value: Any, world_size: int) -> list:
    """``value`` of every process, in rank order (any picklable object, on any backend)."""
    parts: list = [None] * world_size
    dist.all_gather_object(parts, value)
    return parts
