"""``calcinosis serve``: a local web page for pathologists (see :mod:`.app` for the endpoints).

Importing this package is cheap (the parser only); the web stack, the model
and the page load when the command runs.
"""

from .command import add_serve_parser, run_serve

__all__ = ["add_serve_parser", "run_serve"]
