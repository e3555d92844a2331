"""The user contract: what lit_attrib must know about a LightningModule's batches and loss.

Every analysis needs each example's **summed** loss ``(B,)``; token scores need each token's loss
``(B, T)``; results in dataset order need each row's example id; expectations over tokens need to
know which tokens are real and which carry a loss. A :class:`Task` answers these questions, in the
spirit of kronfluence's ``Task``. Nothing else in lit_attrib reads a batch by key.

Two kinds of module need no task at all (:func:`resolve_task` detects them):

- lit_attrib's own modules (``per_example_loss`` / ``per_token_loss`` methods), and
- any module that holds a Hugging Face causal LM (a ``PreTrainedModel`` with an output embedding)
  and feeds it Hugging Face-style dict batches: ``input_ids``, optional ``attention_mask`` and
  ``labels``. **Label convention:** ``labels`` are *unshifted*, as Hugging Face models take them:
  ``labels[b, t]`` is predicted from the tokens before ``t`` (so position 0 never carries a loss),
  ``-100`` marks tokens without a loss. Without ``labels``, every real token after the first is a
  target (``labels = input_ids`` where ``attention_mask`` is 1). Batches whose labels are already
  shifted need a task with their own ``loss_fn`` / ``token_mask``.

For anything else (tuple batches, a loss of one's own) give ``loss_fn``, the only glue most modules
need::

    def summed_loss(module, batch):            # (x, y) tuple batches, y already shifted
        x, y = batch
        logits = module(x)                      # (B, T, V)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(-1)  # (B,)

    KFACCollectorCallback(loss_fn=summed_loss)  # or task=Task(loss_fn=summed_loss, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lit_attrib.errors import ConfigError, ModelError
from lit_attrib.ops.loss import IGNORE_INDEX, loss_mask, token_nll

__all__ = ["CausalLMTask", "HFCausalLMTask", "Task", "batch_size", "find_causal_lm", "function_name", "resolve_task"]

LossFn = Callable[[Any, Any], Any]
"""``f(module, batch) -> Tensor``; typed loosely so that a YAML config may name any function (jsonargparse
would otherwise demand a ``-> torch.Tensor`` annotation on it)."""
BatchFn = Callable[[Any], Any]


def function_name(function: Callable | None) -> str | None:
    """How a user function is recorded in an artifact's arguments (its qualified name), or ``None``."""
    return None if function is None else getattr(function, "__qualname__", repr(function))


def batch_size(batch: Any) -> int:
    """The number of examples in a batch: the first axis of its first tensor (``input_ids`` if a dict has it)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ModelError(f"cannot tell the batch size of a {type(batch).__name__} batch without tensors")


class Task:
    """What lit_attrib needs to know about a module's batches: subclass it, or build it from functions.

    Args:
        loss_fn: ``loss_fn(module, batch) -> (B,)``, each example's loss **summed** over its tokens.
        token_loss_fn: ``token_loss_fn(module, batch) -> (B, T)``, each token's loss (0 where none is
            taken), for token scores; its sum over ``T`` must be ``loss_fn``'s value.
        example_ids: ``example_ids(batch) -> (B,)``, each row's dataset index. Without it, rows are
            numbered in loader order (shuffled loaders are then refused). Default: a dict batch's
            ``index`` entry.
        token_mask: ``token_mask(batch) -> (B, T)`` bool, the tokens whose loss counts, aligned with
            ``token_loss_fn``'s positions: what a token-mean training loss divides by, and which token
            scores are shown.
        padding_mask: ``padding_mask(batch) -> (B, T)`` bool, the real (non-padding) input tokens;
            curvature expectations run over these. Default: a dict batch's ``attention_mask``;
            otherwise every token is real.
        input_ids: ``input_ids(batch) -> (B, T)`` token ids, to show texts and check lengths; default a
            dict's ``input_ids``, or a tuple batch's first 2-D integer tensor.
        logits_fn: ``logits_fn(module, batch) -> (B, T, V)``, next-token logits aligned with
            ``token_mask`` (position ``t`` predicts the target of ``t``), for the true Fisher.
    """

    def __init__(self, loss_fn: LossFn | None = None, token_loss_fn: LossFn | None = None,
                 example_ids: BatchFn | None = None, token_mask: BatchFn | None = None,
                 padding_mask: BatchFn | None = None, input_ids: BatchFn | None = None,
                 logits_fn: LossFn | None = None) -> None:
        self._loss_fn = loss_fn
        self._token_loss_fn = token_loss_fn
        self._example_ids = example_ids
        self._token_mask = token_mask
        self._padding_mask = padding_mask
        self._input_ids = input_ids
        self._logits_fn = logits_fn

    # ------------------------------------------------------------------------- what it can do
    @property
    def has_loss(self) -> bool:
        return self._loss_fn is not None or self.has_token_loss

    @property
    def has_token_loss(self) -> bool:
        return self._token_loss_fn is not None

    @property
    def has_logits(self) -> bool:
        return self._logits_fn is not None

    def describe(self) -> str:
        """A short name for the arguments recorded with results."""
        parts = [function_name(f) for f in (self._loss_fn, self._token_loss_fn) if f is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------------------- losses
    def loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """``(B,)``: each example's summed loss."""
        if self._loss_fn is not None:
            return self._loss_fn(module, batch)
        if self._token_loss_fn is not None:
            return self.token_loss(module, batch).sum(-1)
        raise ConfigError(f"{self.describe()} has no loss; give loss_fn=f(module, batch) -> (B,) summed losses")

    def token_loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """``(B, T)``: each token's loss, 0 where none is taken."""
        if self._token_loss_fn is None:
            raise ConfigError(f"{self.describe()} has no per-token loss; give token_loss_fn=f(module, batch) -> (B, T)")
        return self._token_loss_fn(module, batch)

    def logits(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """``(B, T, V)`` next-token logits aligned with :meth:`token_mask` (for the true Fisher)."""
        if self._logits_fn is None:
            raise ConfigError(f"{self.describe()} cannot give logits; give logits_fn=f(module, batch) -> (B, T, V) "
                              f"aligned with token_mask, or use fisher: empirical")
        return self._logits_fn(module, batch)

    def sampled_loss(self, module: nn.Module, batch: Any, generator: torch.Generator | None) -> torch.Tensor:
        """``(B,)``: each example's summed loss of targets drawn from the model's own prediction (true Fisher)."""
        logits = self.logits(module, batch)  # (B, T, V), position t predicts target t
        mask = self.token_mask(batch)
        if mask is None:
            mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        log_probs = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        sampled = torch.multinomial(log_probs.detach().exp().reshape(-1, log_probs.shape[-1]), 1, generator=generator)
        picked = log_probs.reshape(-1, log_probs.shape[-1]).gather(1, sampled).view(mask.shape)  # (B, T)
        return -(picked * mask.to(picked.dtype)).sum(-1)

    # ------------------------------------------------------------------------- batch layout
    def example_ids(self, batch: Any) -> torch.Tensor | None:
        """``(B,)`` dataset indices of the rows, or ``None`` when the batch does not say."""
        if self._example_ids is not None:
            ids = self._example_ids(batch)
            return None if ids is None else torch.as_tensor(ids).detach().cpu().long().reshape(-1)
        if isinstance(batch, Mapping) and "index" in batch:
            return torch.as_tensor(batch["index"]).detach().cpu().long().reshape(-1)
        return None

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """``(B, T)`` bool: the tokens whose loss counts, or ``None`` when unknown."""
        return None if self._token_mask is None else self._token_mask(batch).bool()

    def forward(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """One forward of the model on the batch, for callbacks that watch it (attention capture): the
        logits where the task can give them, else the loss."""
        return self.logits(module, batch) if self.has_logits else self.loss(module, batch)

    def answer_mask(self, batch: Any) -> torch.Tensor | None:
        """``(B, T)`` bool: the tokens the data marks as targets (an answer), or ``None`` when it marks none."""
        return self.token_mask(batch)

    def column(self, batch: Any, name: str) -> Any:
        """A named per-example column of a dict batch (e.g. ``token_class``), or ``None``."""
        return batch.get(name) if isinstance(batch, Mapping) else None

    def padding_mask(self, batch: Any) -> torch.Tensor | None:
        """``(B, T)`` bool: the real input tokens, or ``None`` when every token is real."""
        if self._padding_mask is not None:
            return self._padding_mask(batch).bool()
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"].bool()
        return None

    def input_ids(self, batch: Any) -> torch.Tensor | None:
        """``(B, T)`` token ids, to decode texts and check lengths; ``None`` when the batch does not say."""
        if self._input_ids is not None:
            return self._input_ids(batch)
        if isinstance(batch, Mapping):
            ids = batch.get("input_ids")
            return ids if isinstance(ids, torch.Tensor) else None
        if isinstance(batch, (list, tuple)):  # (x, y) tuple batches: the first 2-D integer tensor
            return next((v for v in batch if isinstance(v, torch.Tensor) and v.ndim == 2 and not v.is_floating_point()
                         and v.dtype != torch.bool), None)
        return None

    def batch_size(self, batch: Any) -> int:
        return batch_size(batch)


class HFCausalLMTask(Task):
    """The task of a module wrapping a Hugging Face causal LM, fed Hugging Face-style dict batches.

    ``labels`` unshifted (``-100`` = no loss); without ``labels``, every real token after the first.

    Args:
        model: the Hugging Face model inside the module (see :func:`find_causal_lm`).
        name: its attribute path in the module, for messages.
    """

    def __init__(self, model: nn.Module, name: str = "model", **functions) -> None:
        super().__init__(**functions)
        self.model = model
        self.name = name

    @property
    def has_loss(self) -> bool:
        return True

    @property
    def has_token_loss(self) -> bool:
        return True

    @property
    def has_logits(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def _check(self, batch: Any) -> dict:
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            shown = type(batch).__name__ + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            raise ConfigError(
                f"the module wraps a Hugging Face model ('{self.name}'), but its batches are a {shown}, not dicts with "
                f"'input_ids' (and 'attention_mask', 'labels'); give the callback loss_fn=f(module, batch) -> (B,), "
                f"each example's summed loss (see lit_attrib.engine.Task)"
            )
        return batch

    def labels(self, batch: dict) -> torch.Tensor:
        """Unshifted labels: ``batch["labels"]``, else ``input_ids`` with padding set to ``-100``."""
        batch = self._check(batch)
        if "labels" in batch:
            return batch["labels"]
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        if mask is None:
            return ids
        # Padding carries no loss, nor does each row's first real token (nothing before it to predict it
        # from; with left padding it is not at position 0).
        keep = mask.bool() & (mask.long().cumsum(-1) > 1)
        return ids.masked_fill(~keep, IGNORE_INDEX)

    def _hf_logits(self, batch: dict) -> torch.Tensor:
        batch = self._check(batch)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          use_cache=False).logits

    def token_loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self._token_loss_fn is not None:
            return self._token_loss_fn(module, batch)
        return token_nll(self._hf_logits(batch), self.labels(batch))

    def loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(module, batch)
        return self.token_loss(module, batch).sum(-1)

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        if self._token_mask is not None:
            return self._token_mask(batch).bool()
        return loss_mask(self.labels(batch))

    def answer_mask(self, batch: Any) -> torch.Tensor | None:
        if self._token_mask is None and isinstance(batch, Mapping) and "labels" not in batch:
            return None  # prompts only: the data marks no targets
        return self.token_mask(batch)

    def logits(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self._logits_fn is not None:
            return self._logits_fn(module, batch)
        logits = self._hf_logits(batch)  # (B, T, V): position t predicts token t + 1
        return torch.nn.functional.pad(logits[:, :-1], (0, 0, 1, 0))  # aligned with the unshifted labels


class CausalLMTask(HFCausalLMTask):
    """The task of lit_attrib's own modules: their ``per_example_loss`` / ``per_token_loss`` methods."""

    def __init__(self, module: nn.Module, **functions) -> None:
        super().__init__(getattr(module, "model", module), name=type(module).__name__, **functions)
        self.module = module

    def _hf_logits(self, batch: dict) -> torch.Tensor:
        batch = self._check(batch)
        return self.module(batch["input_ids"], batch.get("attention_mask"))  # the module's forward gives logits

    def token_loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self._token_loss_fn is None and hasattr(module, "per_token_loss"):
            return module.per_token_loss(batch)
        return super().token_loss(module, batch)

    def loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self._loss_fn is None and hasattr(module, "per_example_loss"):
            return module.per_example_loss(batch)
        return super().loss(module, batch)


def find_causal_lm(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Hugging Face causal LM inside ``module`` (itself included): a ``PreTrainedModel`` whose
    output embedding exists, with its attribute path; ``None`` when there is none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    for name, child in module.named_modules():
        if isinstance(child, PreTrainedModel):
            head = getattr(child, "get_output_embeddings", lambda: None)()
            if head is not None:
                return name or "(the module itself)", child
    return None


def resolve_task(module: nn.Module, task: Task | None = None, loss_fn: LossFn | None = None,
                 token_loss_fn: LossFn | None = None, *, owner: str, needs: tuple[str, ...] = ("loss",)) -> Task:
    """The task a callback uses for ``module``: ``task``, else one built from ``loss_fn`` /
    ``token_loss_fn``, else the detected one (lit_attrib's own module, or a wrapped Hugging Face model).

    Args:
        owner: the callback, for messages.
        needs: what the callback will ask of the task (``loss``, ``token_loss``, ``logits``).

    Raises:
        ConfigError: both a task and loose functions are given, or nothing provides what ``needs`` names
            (the message names the argument to add).
    """
    if task is not None and (loss_fn is not None or token_loss_fn is not None):
        raise ConfigError(f"{owner}: give either task or loss_fn/token_loss_fn, not both "
                          f"(put the functions into the Task)")
    if task is None:
        functions = {"loss_fn": loss_fn, "token_loss_fn": token_loss_fn}
        if hasattr(module, "per_example_loss") or hasattr(module, "per_token_loss"):
            task = CausalLMTask(module, **functions)
        elif (found := find_causal_lm(module)) is not None:
            task = HFCausalLMTask(found[1], found[0], **functions)
        else:
            task = Task(**functions)
    missing = [what for what in needs if not getattr(task, f"has_{what}")]
    if missing:
        advice = {
            "loss": "loss_fn=f(module, batch) -> (B,), each example's loss summed over its tokens",
            "token_loss": "token_loss_fn=f(module, batch) -> (B, T), each token's loss (0 where none is taken)",
            "logits": "a Task with logits_fn=f(module, batch) -> (B, T, V) aligned with token_mask",
        }
        raise ConfigError(
            f"{owner} cannot tell how {type(module).__name__} computes its loss: it has no per_example_loss/"
            f"per_token_loss and wraps no Hugging Face causal LM. Give " + "; and ".join(advice[m] for m in missing)
            + " (see lit_attrib.engine.Task and docs/own_project.md)"
        )
    return task
