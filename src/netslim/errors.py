"""Exceptions netslim raises for problems the user can fix.

Every `NetslimError` is a user-facing error: its message is one line that says what was
wrong and what to do. The CLI prints it (no traceback) and exits with status 2.
Programming errors stay ordinary exceptions (TypeError, RuntimeError, ...).
"""


class NetslimError(Exception):
    """A problem with the user's input: bad flag, bad file, missing data."""


class ConfigError(NetslimError, ValueError):
    """A flag or argument has a value netslim cannot use."""


class DatasetError(NetslimError):
    """A dataset is missing, incomplete, corrupt or does not fit the model."""


class CheckpointError(NetslimError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the request."""


class PruneError(NetslimError):
    """The model cannot be pruned as asked (untraceable graph, unknown op on a channel path)."""


class FolderBusyError(NetslimError):
    """Another netslim process is writing in the folder (a run, prune or pipeline)."""
