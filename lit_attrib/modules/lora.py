"""LoRA adapters (PEFT) for :class:`~lit_attrib.modules.CausalLMModule`: settings, wrapping, saving and
merging. The adapter layers are plain ``nn.Linear`` modules (``...q_proj.lora_A.default``,
``...q_proj.lora_B.default``), so every analysis tracks them like any linear layer; the frozen base
layers are ``...q_proj.base_layer``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_attrib.errors import ConfigError, ModelError

__all__ = ["LORA_DEFAULTS", "adapter_patterns", "apply_lora", "check_lora", "load_adapter", "trainable_names"]

LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
"""``r`` (rank), ``alpha`` (scaling ``alpha / r``), ``dropout`` (on the adapter's input), ``target_modules``
(names of the linear layers that get an adapter, as PEFT matches them)."""


def check_lora(settings: dict | None) -> list[str]:
    """The problems of a ``lora`` setting (empty when it is fine or absent)."""
    if settings is None:
        return []
    if not isinstance(settings, dict):
        return [f"lora must be a mapping such as {LORA_DEFAULTS}; got {settings!r}"]
    problems = []
    if unknown := sorted(set(settings) - set(LORA_DEFAULTS)):
        problems.append(f"lora has unknown keys {unknown}; known are {sorted(LORA_DEFAULTS)}")
    merged = {**LORA_DEFAULTS, **settings}
    if not isinstance(merged["r"], int) or merged["r"] < 1:
        problems.append(f"lora.r (the rank) must be a positive integer; got {merged['r']!r}")
    if not 0 <= float(merged["dropout"]) < 1:
        problems.append(f"lora.dropout must be in [0, 1); got {merged['dropout']!r}")
    if not merged["target_modules"]:
        problems.append("lora.target_modules is empty; name the linear layers to adapt, e.g. [q_proj, v_proj]")
    return problems


def _peft():
    try:
        import peft
    except ImportError as exc:  # an optional extra
        raise ModelError("LoRA needs the `peft` package: pip install 'lit-attrib[lora]' (or pip install peft)") from exc
    return peft


def apply_lora(model: nn.Module, settings: dict) -> nn.Module:
    """``model`` wrapped with fresh LoRA adapters (only they are trainable)."""
    peft = _peft()
    merged = {**LORA_DEFAULTS, **settings}
    config = peft.LoraConfig(r=merged["r"], lora_alpha=merged["alpha"], lora_dropout=float(merged["dropout"]),
                             target_modules=list(merged["target_modules"]), bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # PEFT: target modules not found
        raise ConfigError(f"lora.target_modules {merged['target_modules']} do not fit the model: {exc}") from None


def load_adapter(model: nn.Module, path: str, trainable: bool = True) -> nn.Module:
    """``model`` with the adapters saved in ``path`` (by ``CausalLMModule.save_adapter``)."""
    peft = _peft()
    try:
        return peft.PeftModel.from_pretrained(model, path, is_trainable=trainable)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load LoRA adapters from '{path}': {exc}") from None


def trainable_names(module: nn.Module) -> set[str]:
    """The names (in ``module.state_dict()``) of the parameters that are trained."""
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def adapter_patterns(settings: dict | None) -> list[str]:
    """``target_modules`` patterns that select every adapter layer (``lora_A`` and ``lora_B``)."""
    merged = {**LORA_DEFAULTS, **(settings or {})}
    return [f"*.{name}.lora_{side}.*" for name in merged["target_modules"] for side in "AB"]
