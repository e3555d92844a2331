"""The ``lit-attrib`` command: LightningCLI with lit_attrib's modules, data and callbacks.

Usage::

    lit-attrib fit -c configs/quickstart.yaml
    lit-attrib predict -c configs/quickstart.yaml -c configs/compare_generation.yaml --ckpt_path last.ckpt
    lit-attrib fit --model.help CausalLMModule      # every argument of a module, with its docs
    lit-attrib inspect-factors runs/quickstart/factors  # plots of saved curvature factors
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

import lit_attrib.callbacks  # noqa: F401  (registers the callbacks for class_path short names)
import lit_attrib.data  # noqa: F401
import lit_attrib.modules  # noqa: F401
from lit_attrib.callbacks import GenerationWriter, KFACCollectorCallback, TrainingMonitor
from lit_attrib.callbacks._common import ArtifactCallback
from lit_attrib.errors import LitAttribError
from lit_attrib.quiet import quiet_known_noise

__all__ = ["LitAttribCLI", "main"]


class LitAttribCLI(LightningCLI):
    """LightningCLI whose trainer always carries a :class:`TrainingMonitor` (configurable as ``monitor``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TrainingMonitor, "monitor")

    def _name_run(self) -> None:
        """Name the TensorBoard run after what it does (``fit``, ``compare``, ``factors``, ``influence``,
        ``validate``...) instead of ``version_N``; a repeated run gets ``_1``, ``_2``... A version given in
        the config is kept."""
        self._started = time.time() - 1.0  # files written from here on are this run's (coarse mtimes)
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger) or logger._version is not None or logger._experiment is not None:
            return
        subcommand = self.config.subcommand
        analyses = [callback.name for callback in self.trainer.callbacks
                    if isinstance(callback, (ArtifactCallback, KFACCollectorCallback))]
        if subcommand == "fit":
            base = "fit"
        elif subcommand in ("validate", "test") and getattr(self.model, "run_name", None):
            base = self.model.run_name  # a module whose evaluation is the analysis (the curvature edit)
        elif analyses:
            base = "+".join(dict.fromkeys(analyses))
        elif subcommand == "predict" and getattr(self.model, "hparams", {}).get("compare_with"):
            base = "compare"
        else:
            base = subcommand
        root, version, count = Path(logger.root_dir), base, 0
        while (root / version).exists():
            count += 1
            version = f"{base}_{count}"
        logger._version = version

    def _summary(self) -> None:
        """One short block at the end of a run: what was written where."""
        trainer = self.trainer
        written = []
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            written.append(f"TensorBoard run: {trainer.logger.log_dir}")
        checkpoint = trainer.checkpoint_callback
        if self.config.subcommand == "fit" and checkpoint is not None and checkpoint.dirpath:
            best = f" (best: {Path(checkpoint.best_model_path).name})" if checkpoint.best_model_path else ""
            written.append(f"checkpoints: {checkpoint.dirpath}{best}")
        for callback in trainer.callbacks:
            if isinstance(callback, KFACCollectorCallback) and callback._written is not None:
                written.append(f"{callback.name}: {callback._written}")
            elif isinstance(callback, ArtifactCallback) and self._new(callback.folder(trainer) / callback.metadata_file):
                written.append(f"{callback.name}: {callback.folder(trainer)}")
            elif isinstance(callback, GenerationWriter) and self._new(callback._dir(trainer) / "generated.jsonl"):
                written.append(f"generations: {callback._dir(trainer) / 'generated.jsonl'}")
        if written:
            rank_zero_info("lit-attrib " + self.config.subcommand + " wrote:\n  " + "\n  ".join(written))

    def _new(self, path: Path) -> bool:
        """Whether ``path`` was written by this run (not left by an earlier one)."""
        return path.is_file() and path.stat().st_mtime >= getattr(self, "_started", 0.0)

    def after_fit(self) -> None:
        self._summary()

    def after_validate(self) -> None:
        self._summary()

    def after_test(self) -> None:
        self._summary()

    def after_predict(self) -> None:
        self._summary()

    def before_fit(self) -> None:
        self._name_run()

    def before_validate(self) -> None:
        self._name_run()

    def before_test(self) -> None:
        self._name_run()

    def before_predict(self) -> None:
        self._name_run()

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


def inspect_factors(path: str, modules: str | list[str] | None = None, tensorboard_dir: str | None = None,
                    step: int = 0) -> list[str]:
    """Plot saved curvature factors without collecting them again.

    Writes the eigenvalue spectra of A and G, their cumulative variance explained, the EKFAC Λ heatmap
    and the sorted Λ values (symlog) as PNG files into ``PATH/plots``, and optionally to TensorBoard.

    Args:
        path: folder holding factors.safetensors and factors.json.
        modules: fnmatch patterns of the layers to plot, comma-separated or a list (default: the last
            tracked down_proj).
        tensorboard_dir: also write the figures and histograms as TensorBoard events here.
        step: TensorBoard global step of the events.
    """
    from lit_attrib.artifacts import load_factors
    from lit_attrib.plotting import write_factor_plots

    if isinstance(modules, str):
        modules = [pattern.strip() for pattern in modules.split(",") if pattern.strip()]
    factors = load_factors(path)
    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tensorboard_dir)
    files = write_factor_plots(factors, path, modules, logger=writer, tag=factors.metadata.get("name", "factors"),
                               step=step)
    if writer is not None:
        writer.close()
    for file in files:
        print(file)
    return [str(file) for file in files]


def _tools() -> dict:
    """The tools' functions (imported on use: ``lit-attrib fit`` does not pay for them)."""
    from lit_attrib.tools.index_query import index_query
    from lit_attrib.tools.noise_robustness import noise_robustness as run
    from lit_attrib.tools.real_model import get_model

    return {"inspect-factors": inspect_factors, "noise-robustness": run, "index-query": index_query,
            "get-model": get_model}


TOOLS = ("inspect-factors", "noise-robustness", "index-query", "get-model")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-attrib``; lit_attrib's own errors print as one message and exit with code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    quiet_known_noise(argv[0] if argv else None)
    try:
        if argv and argv[0] in TOOLS:
            from jsonargparse import CLI

            rest = ["--config" if arg == "-c" else arg for arg in argv[1:]]  # -c as for fit/validate/...
            CLI(_tools()[argv[0]], args=rest, prog=f"lit-attrib {argv[0]}")
            return
        LitAttribCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": "lit-attrib: fine-tune and attribute Hugging Face causal LMs with Lightning. "
                "Run `lit-attrib fit --model.help CausalLMModule` for a module's arguments. "
                "Tools: `lit-attrib inspect-factors --help` (plots of saved factors), "
                "`lit-attrib noise-robustness --help` (seed 004's DiffLlama-vs-Llama sweep), "
                "`lit-attrib index-query --help` (top-k training examples of prompts from a gradient index), "
                "`lit-attrib get-model --help` (a real pretrained model offline: SmolLM2-135M-Instruct)."
            },
        )
    except LitAttribError as exc:
        print(f"lit-attrib: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down a DDP process group before the interpreter does: a gloo group left to the interpreter's exit can
    abort the process ("terminate called without an active exception") after all the work was written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
