"""CausalLMModule: fine-tune (and generate with) a Hugging Face causal LM under Lightning."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from lit_attrib.errors import ConfigError, ModelError, TrainingError
from lit_attrib.lightning_compat import restore_train_loader_state
from lit_attrib.modules.loading import build_causal_lm, module_tokenizer, record_datamodule_tokenizer
from lit_attrib.modules.lora import apply_lora, check_lora, load_adapter, trainable_names
from lit_attrib.ops.loss import loss_mask, token_nll

__all__ = ["CausalLMModule", "SCHEDULERS"]

SchedulerName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__


class CausalLMModule(LightningModule):
    """A Hugging Face ``AutoModelForCausalLM`` trained with token-mean NLL on the label tokens.

    The per-example contract that lit_attrib's analysis callbacks use:

    - :meth:`per_token_loss` ``(B, T)``: NLL of each label token (0 where the label is -100);
    - :meth:`per_example_loss` ``(B,)``: its sum over the sequence (the **sum**-reduced loss).

    ``training_step`` returns the token mean of the batch (``loss_reduction = "token_mean"``).

    Args:
        pretrained: hub id or local path of pretrained weights (e.g. ``TinyLlama/TinyLlama_v1.1``).
        config: instead of ``pretrained``, a config dict for a fresh model, e.g. ``{model_type: llama,
            hidden_size: 64, num_hidden_layers: 2, ...}``; ``vocab_size`` and special token ids default
            to the tokenizer's.
        tokenizer: tokenizer hub id or path; defaults to the datamodule's tokenizer, then ``pretrained``.
        init_seed: seed of the initial weights of a ``config`` model (independent of the global seed).
        dtype: dtype of the weights (keep ``float32`` and use ``trainer.precision: bf16-mixed``).
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2`` (default: transformers').
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        fused: use the fused AdamW kernel; ``None`` picks it wherever the device supports it.
        scheduler: learning-rate schedule after warmup (transformers' names).
        warmup_steps: linear warmup, in optimizer steps (int) or as a fraction of all steps (float < 1).
        num_cycles: cycles of ``cosine`` (0.5 = half wave) / hard restarts of ``cosine_with_restarts``.
        max_new_tokens: tokens generated per prompt in ``predict``.
        do_sample: sample instead of greedy decoding in ``predict``.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: top-k sampling cut-off.
        compare_with: also generate with a second model in ``predict`` for a side-by-side table:
            ``base`` (the same ``pretrained``/``config`` before fine-tuning) or a hub id / path.
        lora: fine-tune LoRA adapters instead of every weight (needs ``peft``): ``{r: 8, alpha: 16,
            dropout: 0.0, target_modules: [q_proj, v_proj]}`` (missing keys take these defaults). Only
            the adapters are trained and only they are saved in checkpoints; the base weights come from
            ``pretrained``/``config`` again when a checkpoint is loaded. Analyses track the adapter
            layers by patterns such as ``"*.q_proj.lora_A.*"`` and ``"*.q_proj.lora_B.*"``.
        adapter: a folder of LoRA adapters written by :meth:`save_adapter`, loaded onto the base model
            (trainable, so fine-tuning continues from them).
    """

    loss_reduction = "token_mean"

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        init_seed: int = 0,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        scheduler: SchedulerName = "cosine",
        warmup_steps: int | float = 0,
        num_cycles: float = 0.5,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        compare_with: str | None = None,
        lora: dict[str, Any] | None = None,
        adapter: str | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if (pretrained is None) == (config is None):
            problems.append("give exactly one of `pretrained` (hub id or path) and `config` (dict with model_type)")
        if scheduler not in SCHEDULERS:
            problems.append(f"unknown scheduler '{scheduler}'; choose one of {list(SCHEDULERS)}")
        if learning_rate <= 0:
            problems.append(f"learning_rate must be > 0; got {learning_rate}")
        if isinstance(warmup_steps, float) and not 0 <= warmup_steps < 1:
            problems.append(f"warmup_steps as a fraction must be in [0, 1); got {warmup_steps}")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        problems += check_lora(lora)
        if problems:
            raise ConfigError("invalid CausalLMModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        # Checkpoints of an adapted model hold only the adapters (checked in on_load_checkpoint).
        self.strict_loading = not self.uses_lora
        self.val_loss = torchmetrics.MeanMetric()
        self.val_perplexity = torchmetrics.text.Perplexity(ignore_index=-100)

    # ------------------------------------------------------------------------------- building
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: ``tokenizer``, else the datamodule's, else ``pretrained``'s."""
        return module_tokenizer(self)

    def setup(self, stage: str) -> None:
        # Record the datamodule's tokenizer in our hparams: checkpoints then name the tokenizer they need.
        record_datamodule_tokenizer(self)

    def configure_model(self) -> None:
        """Build the network once (Lightning calls this before restoring checkpoints and under FSDP)."""
        if self.model is not None:
            return
        model = self._build(self.hparams.pretrained, self.hparams.config)
        if self.hparams.get("adapter"):
            model = load_adapter(model, self.hparams.adapter)
        elif self.hparams.get("lora") is not None:
            model = apply_lora(model, self.hparams.lora)
        # from_pretrained returns eval mode; a module is built in train mode (as nn.Module is) so that Lightning's
        # model summary and fit see it as it trains. Lightning's evaluation and predict loops set eval mode.
        self.model = model.train()

    @property
    def uses_lora(self) -> bool:
        """Whether the model carries LoRA adapters (and only they are trained)."""
        return self.hparams.get("lora") is not None or bool(self.hparams.get("adapter"))

    def save_adapter(self, path: str) -> None:
        """Write the LoRA adapters (PEFT's ``save_pretrained``: adapter weights and config only) to ``path``."""
        if not self.uses_lora:
            raise ModelError("save_adapter: this CausalLMModule has no LoRA adapters (set lora)")
        self.model.save_pretrained(path)

    def merge_adapter(self) -> None:
        """Fold the adapters into the base weights (``W + (alpha / r) B A``); the model is a plain model again."""
        if not self.uses_lora:
            raise ModelError("merge_adapter: this CausalLMModule has no LoRA adapters (set lora)")
        self.model = self.model.merge_and_unload()
        self.hparams.lora = self.hparams.adapter = None
        self.strict_loading = True

    def base_fingerprint(self) -> dict[str, Any]:
        """What an adapters-only checkpoint needs to match: a checksum of the frozen weights and the LoRA
        settings (a checkpoint of adapters trained on another base model must not load silently)."""
        from lit_attrib.callbacks._common import tensors_checksum  # callbacks import modules' neighbours

        trained = trainable_names(self)
        frozen = [p for name, p in sorted(self.named_parameters()) if name not in trained]
        return {"frozen_weights": tensors_checksum(frozen), "lora": self.hparams.get("lora"),
                "adapter": self.hparams.get("adapter")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.uses_lora:  # only what is trained: the base weights are rebuilt from pretrained/config
            keep = trainable_names(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            checkpoint["lit_attrib_base"] = self.base_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.uses_lora and self.model is not None:
            saved, own = checkpoint.get("lit_attrib_base"), self.base_fingerprint()
            if saved != own:
                raise ModelError(
                    f"the checkpoint holds LoRA adapters trained on another base model or with other LoRA settings "
                    f"(saved {saved}, this model {own}); build the model as it was built for training (same "
                    f"pretrained/config, init_seed and lora)"
                )
            expected, saved = trainable_names(self), set(checkpoint.get("state_dict", {}))
            if saved != expected:
                raise ModelError(
                    f"the checkpoint's adapter weights do not match this model's LoRA adapters: missing "
                    f"{sorted(expected - saved)[:4]}, unexpected {sorted(saved - expected)[:4]}; load it with the "
                    f"lora settings it was trained with"
                )

    def on_fit_start(self) -> None:
        # from_pretrained returns a model in eval mode: fine-tuning must run in train mode (dropout on);
        # Lightning puts it in eval mode for validation and the analysis passes, and back afterwards.
        self.train()

    def _build(self, pretrained: str | None, config: dict | None) -> PreTrainedModel:
        hp = self.hparams
        tokenizer = self.tokenizer if config is not None else None
        return build_causal_lm(
            pretrained=pretrained, config=config, tokenizer=tokenizer, init_seed=hp.init_seed,
            dtype=hp.dtype, attn_implementation=hp.attn_implementation,
        )

    # ----------------------------------------------------------------------- loss contract
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, V)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def per_token_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T)`` NLL of each label token, aligned with ``batch["labels"]``; 0 where no loss is taken."""
        return token_nll(self(batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` summed NLL over each example's label tokens."""
        return self.per_token_loss(batch).sum(dim=-1)

    # ------------------------------------------------------------------------------- steps
    def on_train_start(self) -> None:
        restore_train_loader_state(self.trainer)  # resume mid-epoch at the next batch, not the first

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        token_loss = self.per_token_loss(batch)
        num_tokens = loss_mask(batch["labels"]).sum()
        loss = token_loss.sum() / num_tokens.clamp(min=1)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}, dataset indices {batch['index'].tolist()}). Lower the learning rate, enable "
                f"gradient clipping (trainer.gradient_clip_val), or check the data of that batch."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"]
        num_tokens = loss_mask(labels).sum()
        if num_tokens == 0:
            return
        self.val_loss.update(token_nll(logits, labels).sum() / num_tokens, weight=num_tokens)
        self.val_perplexity.update(logits[:, :-1].float(), labels[:, 1:])
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("val/perplexity", self.val_perplexity, batch_size=labels.shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    # ------------------------------------------------------------------------ generation
    def on_predict_start(self) -> None:
        if self.hparams.compare_with is None:
            self._comparison_model = None
            return
        if self.hparams.compare_with == "base":
            model = self._build(self.hparams.pretrained, self.hparams.config)
            if self.trainer.ckpt_path is None and self.hparams.pretrained is not None:
                rank_zero_warn("compare_with='base' without --ckpt_path: both columns come from the same weights")
        else:
            model = self._build(self.hparams.compare_with, None)
        # A plain attribute, not a submodule: it must stay out of state_dict and checkpoints.
        object.__setattr__(self, "_comparison_model", model.to(self.device).eval())

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]] | None:
        """Generate answers to a batch of prompts; a batch of whole examples (with ``labels``) is an
        analysis pass, where the callbacks do the work and nothing is generated."""
        if "labels" in batch:
            return None
        rows = [
            {"index": int(index), "prompt": prompt, "reference": reference}
            for index, prompt, reference in zip(batch["index"].tolist(), batch["prompt"], batch["reference"])
        ]
        for key, model in (("generated", self.model), ("generated_base", getattr(self, "_comparison_model", None))):
            if model is None:
                continue
            for row, text in zip(rows, self._generate(model, batch)):
                row[key] = text
        return rows

    @torch.no_grad()
    def _generate(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[str]:
        hp = self.hparams
        tokenizer = self.tokenizer
        sampling = {"temperature": hp.temperature, "top_p": hp.top_p, "top_k": hp.top_k} if hp.do_sample else {}
        output = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=hp.max_new_tokens,
            do_sample=hp.do_sample, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:]  # (B, new) after the left-padded prompt
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    # ------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        fused = hp.fused
        if fused is None:
            fused = self.device.type in ("cuda", "cpu", "xpu", "mps") and all(p.is_floating_point() for p in decay)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, fused=fused,
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ModelError("the learning-rate schedule needs a finite length: set trainer.max_steps or max_epochs")
        warmup = hp.warmup_steps
        warmup = int(warmup * total_steps) if isinstance(warmup, float) else int(warmup)
        extra = {"num_cycles": hp.num_cycles} if hp.scheduler in ("cosine", "cosine_with_restarts") else {}
        if hp.scheduler == "cosine_with_restarts":
            extra["num_cycles"] = max(int(hp.num_cycles), 1)
        scheduler = get_scheduler(
            hp.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=int(total_steps),
            scheduler_specific_kwargs=extra,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
