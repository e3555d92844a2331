"""Known noise, filtered where it arises: each entry names a message lit_attrib's users cannot act on
and says why. Everything else (real warnings, progress bars, lit_attrib's own lines) still shows.

``lit-attrib`` installs these filters when it starts; a Python user can call :func:`quiet_known_noise`.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["KNOWN_NOISE", "PREDICT_RETURNED_NONE", "quiet_known_noise"]

PREDICT_RETURNED_NONE = r"predict returned None if it was on purpose"
"""Lightning's notice on every predict batch whose ``predict_step`` returns nothing."""

KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    (r"'set_vital' is deprecated",
     "torchdata's StatefulDataLoader calls a torch API that torch deprecated; nothing to change on our side"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's pytree helper uses an API that newer torch deprecates; fixed upstream in Lightning"),
    (PREDICT_RETURNED_NONE, "analysis passes predict nothing on purpose: the callbacks do the work"),
)
"""``(message regex, why)`` of warnings that are always noise for lit_attrib's runs."""

_ANALYSIS_NOISE: tuple[tuple[str, str], ...] = (
    (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
     "an analysis pass loads a fine-tune's weights with ckpt_path; the training callbacks are not needed"),
)
"""Noise only in ``validate``/``test``/``predict`` passes, where a checkpoint is loaded for its weights."""

_TIPS = re.compile(r"^💡 Tip:")


class _DropTips(logging.Filter):
    """Lightning's advertising tips ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TIPS.match(record.getMessage())


def quiet_known_noise(stage: str | None = None) -> None:
    """Install the filters of :data:`KNOWN_NOISE` (and, for an analysis ``stage``, of the ckpt_path notice)."""
    noise = KNOWN_NOISE + (_ANALYSIS_NOISE if stage in ("validate", "test", "predict") else ())
    for message, _why in noise:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())
