"""Exceptions raised by the collector package."""


class ModelError(Exception):
    """A model could not be found, reached or converted."""


class EngineError(Exception):
    """The vLLM server failed to start, died, or answered with an error."""


class AdapterRejected(EngineError):
    """An adapter failed pre-flight or loading; nothing was switched."""
