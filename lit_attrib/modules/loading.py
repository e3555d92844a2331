"""Build a Hugging Face causal LM from a hub id, a local path, or a config dict (tiny models)."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lit_attrib.data.tokenizer import load_tokenizer
from lit_attrib.errors import ModelError
from lit_attrib.hub import load_from_hub_or_path
from lit_attrib.io import load_checkpoint, load_state_checked

__all__ = ["TESTED_MODEL_TYPES", "build_causal_lm", "configure_base_model", "module_tokenizer", "record_datamodule_tokenizer"]

TESTED_MODEL_TYPES = ("llama", "diffllama", "olmo2", "gpt2")
"""Model types that lit_attrib's test suite builds and trains; other causal LMs usually work too."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config_from_dict(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None):
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"the model config needs a 'model_type' (one of {list(TESTED_MODEL_TYPES)}); got keys {sorted(config)}")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        raise ModelError(
            f"unknown model_type '{model_type}'"
            + (f"; did you mean {close}?" if close else "")
            + f" Tested model types: {list(TESTED_MODEL_TYPES)}."
        )
    if tokenizer is not None:
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key)
            if value is not None:
                config.setdefault(key, value)
    if "vocab_size" not in config:
        raise ModelError("a model built from `config` needs `vocab_size`, or a tokenizer to take it from")
    try:
        return AutoConfig.for_model(model_type, **config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid config for model_type '{model_type}': {exc}") from None


def build_causal_lm(
    *,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    init_seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load ``pretrained`` weights, or initialise a fresh model from ``config`` (exactly one of them).

    A model built from a config is initialised under its own ``init_seed`` (independent of the global
    seed), so the same config always gives the same initial weights: this is what makes "the base
    model" of a from-scratch run reproducible.

    Raises:
        ModelError: neither or both sources given, unknown model type, missing path, or hub offline.
    """
    if (pretrained is None) == (config is None):
        raise ModelError("give exactly one of `pretrained` (hub id or local path) and `config` (a dict with model_type)")
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {list(_DTYPES)}; got '{dtype}'")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if pretrained is not None:
        return load_from_hub_or_path(
            pretrained, lambda name: AutoModelForCausalLM.from_pretrained(name, **kwargs), what="model", error=ModelError
        )
    model_config = _config_from_dict(config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            return AutoModelForCausalLM.from_config(model_config, **kwargs)
        except ValueError as exc:
            raise ModelError(f"cannot build a causal LM from model_type '{model_config.model_type}': {exc}") from None


def module_tokenizer(module: Any) -> PreTrainedTokenizerBase:
    """A LightningModule's tokenizer: its ``hparams.tokenizer``, else its datamodule's, else ``hparams.pretrained``'s."""
    name = module.hparams.tokenizer
    if name is None:
        trainer = module._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        name = getattr(datamodule, "tokenizer_name", None) or module.hparams.pretrained
    if name is None:
        raise ModelError(f"{type(module).__name__} needs a tokenizer: set model.tokenizer or use a datamodule that has one")
    return load_tokenizer(name)


def configure_base_model(module: Any) -> None:
    """Give an analysis module its base model ``module.model``, as its hyperparameters say.

    The architecture and initial weights come from ``hparams.pretrained`` (hub id or path) or
    ``hparams.config`` (a fresh model, vocabulary from the module's tokenizer); then the weights of
    ``hparams.checkpoint`` (a Lightning checkpoint of a ``CausalLMModule``) are loaded into the module,
    if given (read without unpickling unless ``hparams.trust_checkpoint``). With a checkpoint but neither
    ``pretrained`` nor ``config``, the model is built as the checkpoint's own hyperparameters say. Used by
    every module that evaluates or edits a trained model (``CurvatureEditModule``, ``EvalModule``); the
    module's weights are ``model.*``, as in ``CausalLMModule``.

    Raises:
        ModelError: the checkpoint names no model and none is given.
        ArtifactError: the checkpoint is missing, needs unpickling but is not trusted, or holds another model's
            weights.
    """
    hp = module.hparams
    checkpoint = None
    if hp.checkpoint is not None:
        checkpoint = load_checkpoint(
            hp.checkpoint, trust_pickle=bool(hp.get("trust_checkpoint", False)),
            opt_in=f"set {type(module).__name__}'s trust_checkpoint: true (--model.trust_checkpoint true)")
    pretrained, config, init_seed = hp.pretrained, hp.config, hp.init_seed
    if pretrained is None and config is None:
        saved = checkpoint.get("hyper_parameters", {})
        pretrained, config, init_seed = saved.get("pretrained"), saved.get("config"), saved.get("init_seed", 0)
        if pretrained is None and config is None:
            raise ModelError(f"checkpoint '{hp.checkpoint}' does not say which model it holds (no `pretrained` "
                             f"or `config` hyperparameter); give model.pretrained or model.config")
    module.model = build_causal_lm(
        pretrained=pretrained, config=config, tokenizer=module.tokenizer if config is not None else None,
        init_seed=init_seed, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
    )
    if checkpoint is not None:
        load_state_checked(module, checkpoint, hp.checkpoint)


def record_datamodule_tokenizer(module: Any) -> None:
    """Record the datamodule's tokenizer in the module's hyperparameters (when none was given), so that
    checkpoints name the tokenizer they need; also in the initial ones, which the logger merges with
    the data's."""
    datamodule = getattr(module.trainer, "datamodule", None)
    if module.hparams.tokenizer is None and getattr(datamodule, "tokenizer_name", None):
        module.hparams.tokenizer = module._hparams_initial.tokenizer = datamodule.tokenizer_name
