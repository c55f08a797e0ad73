"""Exceptions that carry a message meant for the user, not a stack trace.

The CLI reports each of them in one line (see ``selfsup3d.cli``); the message says what is wrong and, where
there is one, what to do."""


class ConfigError(ValueError):
    """A configuration that cannot work (bad sizes, impossible combinations).

    The CLI turns it into a usage error naming the offending keys, like jsonargparse's own errors."""


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model they are loaded into; the message names the keys or the architecture
    fields that differ."""


class WeightsFileError(ValueError):
    """A file given as weights (``checkpoint_path``, ``init_encoder_from``, a teacher) that holds none that can be
    read safely: not a state dict, checkpoint or ``.safetensors`` file, or one with pickled Python objects."""


class WeightsUnavailableError(OSError):
    """Pretrained weights that cannot be fetched (no network, offline mode, not in the local cache); the message
    says how to get them onto the machine and where to point the configuration."""
