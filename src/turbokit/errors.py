"""Errors a user can cause. The CLI prints them as one line and exits non-zero; bugs stay tracebacks."""


class TurbokitError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ModelNotFoundError(TurbokitError):
    """The model path, file or hub id cannot be found or loaded."""


class InvalidRequestError(TurbokitError):
    """Generation settings that cannot work together (size, steps, strength, ...)."""
