"""The ``lit-attrib`` command: LightningCLI with lit_attrib's modules, data and callbacks.

Usage::

    lit-attrib fit -c configs/quickstart.yaml
    lit-attrib predict -c configs/quickstart.yaml -c configs/compare_generation.yaml --ckpt_path last.ckpt
    lit-attrib fit --model.help CausalLMModule      # every argument of a module, with its docs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lit_attrib.callbacks  # noqa: F401  (registers the callbacks for class_path short names)
import lit_attrib.data  # noqa: F401
import lit_attrib.modules  # noqa: F401
from lit_attrib.callbacks import TrainingMonitor
from lit_attrib.errors import LitAttribError

__all__ = ["LitAttribCLI", "main"]


class LitAttribCLI(LightningCLI):
    """LightningCLI whose trainer always carries a :class:`TrainingMonitor` (configurable as ``monitor``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TrainingMonitor, "monitor")

    def _parse_ckpt_path(self) -> None:
        """Keep the given config authoritative when ``--ckpt_path`` is set, and say what differs.

        LightningCLI would overwrite the model arguments with the checkpoint's hyperparameters, which
        silently discards predict-time settings such as ``compare_with`` or ``max_new_tokens``. The
        weights still come from the checkpoint; a different architecture fails loudly when they load.
        """
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        given = self.config[self.config.subcommand].get("model", {}).get("init_args", {})
        given = dict(given) if given else {}
        differing = sorted(
            k for k in saved.keys() & given.keys()
            if k != "_instantiator" and given[k] is not None and _plain(saved[k]) != _plain(given[k])
        )
        if differing:
            rank_zero_info(
                "the model arguments differ from those saved in the checkpoint "
                + ", ".join(f"{k}: checkpoint {saved[k]!r} vs given {given[k]!r}" for k in differing)
                + " (the given ones are used; weights come from the checkpoint)"
            )


def _plain(value):
    """Containers as plain lists/dicts, so that a YAML list equals the tuple it was parsed into."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-attrib``; lit_attrib's own errors print as one message and exit with code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        LitAttribCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": "lit-attrib: fine-tune and attribute Hugging Face causal LMs with Lightning. "
                "Run `lit-attrib fit --model.help CausalLMModule` for a module's arguments."
            },
        )
    except LitAttribError as exc:
        print(f"lit-attrib: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
