"""Exception types of the package.

Every error a user can cause (a bad file, an impossible device, a mismatched state) is raised as a
subclass of `PlaygroundError` with one readable sentence, so the UI can show it as-is.
"""


class PlaygroundError(Exception):
    """Base class for errors with a message meant for the user."""


class LoadError(PlaygroundError):
    """A checkpoint, tokenizer or state file could not be loaded, or the device/dtype is unavailable."""


class StateError(PlaygroundError):
    """A recurrent state does not fit the model it is used with."""


class GenerationError(PlaygroundError):
    """A generation request cannot be carried out (empty prompt, token budget too large...)."""
