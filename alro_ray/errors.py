"""Errors users see. Each says what is wrong and where, so it can be fixed without a traceback."""


class AlroError(ValueError):
    """Base class of the project's user-facing errors."""


class ConfigError(AlroError):
    """A config key, value or override that cannot be used."""


class DataError(AlroError):
    """Input data that cannot be read: names the file and, where known, the line."""


class NonFiniteError(AlroError):
    """A loss, gradient or score that is NaN or infinite: training, ranking and Serve refuse it
    rather than carry on with a model that no longer means anything."""
