"""Errors that fastedit reports to users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class FasteditError(Exception):
    """Base class: a problem with the user's input or environment, with a message that says what to do."""


class UnknownArchitectureError(FasteditError):
    """A model_type that has no ArchSpec in the registry."""


class ModelLoadError(FasteditError):
    """A model or tokenizer could not be loaded (unknown alias, missing path, offline hub, bad GGUF...)."""


class ConfigError(FasteditError):
    """A typed config (hparams, run options) has unknown keys, missing keys or values of the wrong type."""


class RequestError(FasteditError):
    """Edit requests that cannot be parsed or fail validation (every bad record is named by its index)."""


class PatchError(FasteditError):
    """A patch file that is unreadable, made for another model, or not applied when reverting."""


class OutputError(FasteditError):
    """An output path that cannot be written, or that holds an earlier result not to be overwritten unasked."""
