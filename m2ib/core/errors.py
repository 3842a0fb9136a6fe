"""Errors that name the offending input, so a user never has to read a traceback to know what went wrong."""


class M2IBError(Exception):
    """Base class of every error this suite raises on purpose."""


class InputError(M2IBError, ValueError):
    """An image, caption, box, map or hyperparameter that cannot be used as given."""


class ModelUnavailableError(M2IBError, RuntimeError):
    """Weights or a model definition that are not on this machine (offline, or not downloaded yet)."""


class DataUnavailableError(M2IBError, FileNotFoundError):
    """A data set file or folder that is missing; the message says what to download and where to put it."""


class UnsupportedError(M2IBError, NotImplementedError):
    """A method or metric that cannot apply to this model family."""
