"""The errors a trainer's command line reports as one line and exit status 2 (`train.task.cli`):
input the user can fix, never a bug."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad command-line input (unknown names, targets matching nothing, ...)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, truncated, corrupted, or from another run)."""


class AssetError(RuntimeError):
    """An offline asset is missing and could not be fetched."""


USER_ERRORS = (ConfigError, CheckpointError, AssetError)
