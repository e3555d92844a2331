"""Project exceptions: one type per domain, each message says what was seen, what was expected and how to fix it."""

__all__ = ["LitAttribError", "ConfigError", "DataError", "ModelError", "TrainingError", "ArtifactError"]


class LitAttribError(Exception):
    """Base class of every error lit_attrib raises on purpose.

    The ``lit-attrib`` command prints these as one clear message (no traceback) and exits with code 2.
    """


class DataError(LitAttribError):
    """The data (files, columns, splits, lengths) cannot be used as configured."""


class ModelError(LitAttribError):
    """The model cannot be built or loaded as configured."""


class TrainingError(LitAttribError):
    """Training went wrong in a way that must stop the run (e.g. a non-finite loss)."""


class ArtifactError(LitAttribError):
    """An artifact on disk is missing, incomplete, or does not match the model it is used with."""


class ConfigError(LitAttribError, ValueError):
    """An argument is invalid, or a callback lacks something it needs from the user (a loss, example ids)."""
