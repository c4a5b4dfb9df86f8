"""Data, the synthetic generator, the training loop, metrics and calibration."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calcinosis")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
