"""The project's own error types.

Every failure a user can cause (a bad file, a bad config key, a broken
checkpoint) raises a subclass of :class:`CalcinosisError` whose message names
the file, row or key and says how to fix it. The command line prints these
without a traceback; anything else is a bug.
"""

from __future__ import annotations


class CalcinosisError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(CalcinosisError, ValueError):
    """A config file or ``key=value`` override is invalid."""


class DataError(CalcinosisError, ValueError):
    """A dataset (folder, manifest, mask) is unusable as given."""


class ImageReadError(CalcinosisError, OSError):
    """An image file cannot be read or decoded."""


class CheckpointError(CalcinosisError, ValueError):
    """A checkpoint or weights file is missing, corrupt or does not fit the model."""


class TrainingError(CalcinosisError, RuntimeError):
    """Training cannot continue (for example the loss became NaN)."""
