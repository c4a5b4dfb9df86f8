"""``calcinosis serve``: a local web page for pathologists (see :mod:`.app` for the endpoints).

Importing this package is cheap (the options only; the command itself is
declared in :mod:`calcinosis.inference.cli`); the web stack, the model and the
page load when the command runs.
"""

from .command import run_serve, serve_arguments

__all__ = ["run_serve", "serve_arguments"]
