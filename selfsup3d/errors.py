"""Exceptions that carry a message meant for the user, not a stack trace."""


class ConfigError(ValueError):
    """A configuration that cannot work (bad sizes, impossible combinations).

    The CLI turns it into a usage error naming the offending keys, like jsonargparse's own errors."""


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model they are loaded into; the message names the keys."""
