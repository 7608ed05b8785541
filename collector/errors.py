"""Exceptions raised by the collector package (all ``UserError``s: shown as one line)."""

from storage.errors import UserError


class ModelError(UserError):
    """A model could not be found, reached or converted."""


class EngineError(UserError):
    """The vLLM server failed to start, died, or answered with an error."""


class AdapterRejected(EngineError):
    """An adapter failed pre-flight or loading; nothing was switched."""
