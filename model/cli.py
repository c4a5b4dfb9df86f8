"""The ``calcinosis`` command line: a thin dispatcher over the commands each package declares.

``training`` (``synth``, ``train``, ``evaluate``) and ``inference``
(``predict``, ``export``, ``bench``, ``robustness``) each declare their
commands as :class:`Command` objects in their own ``cli`` module and register
them in ``pyproject.toml`` under the entry-point group ``calcinosis.commands``.
This module finds them there (``importlib.metadata``), so it imports neither
package, and neither package imports the other to offer its commands; a
third package could add a command the same way. Parsers are cheap to build,
so ``--help`` answers at once; a command's work is imported only when it runs.

Errors the user can fix (:class:`CalcinosisError`) are printed as one clear
line without a traceback and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, version

from .errors import CalcinosisError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Command",
    "add_tta_argument",
    "build_parser",
    "commands",
    "main",
    "package_version",
]

#: The entry-point group the commands are registered under.
ENTRY_POINT_GROUP = "calcinosis.commands"

DESCRIPTION = (
    "Calcinosis cutis versus its mimics (osteoma cutis, gout, amyloidosis, normal skin) "
    "in H&E, von Kossa and Alizarin red patches: synthetic data, training, evaluation "
    "and inference."
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, its options, and the function that runs it."""

    name: str
    #: Position in ``calcinosis --help`` (the story's order: data, training, use).
    order: int
    #: ``add_arguments(parser)`` declares the command's options on its own sub-parser.
    add_arguments: Callable[[argparse.ArgumentParser], object]
    #: ``"module:function"``; the function takes the parsed arguments and returns an exit code.
    run: str
    #: One line for ``calcinosis --help``.
    help: str
    #: The paragraph of ``calcinosis NAME --help`` (default: ``help``).
    description: str | None = None


def commands() -> list[Command]:
    """The registered commands, in help order."""
    found: dict[str, Command] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cmd = ep.load()
        if not isinstance(cmd, Command) or cmd.name != ep.name:
            raise TypeError(
                f"entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP!r} is not a "
                f"calcinosis.model.cli.Command named {ep.name!r}"
            )
        found.setdefault(cmd.name, cmd)  # the same distribution seen twice on sys.path
    return sorted(found.values(), key=lambda c: (c.order, c.name))


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """``--tta``, shared by ``evaluate`` and ``predict`` so that both say the same."""
    p.add_argument(
        "--tta",
        choices=("none", "d4"),
        default=None,
        help="test-time augmentation: d4 averages over the 8 rotations/reflections of each "
        "patch or tile (8x the compute); default: the checkpoint's inference.tta, the mode its "
        "temperature was fitted in, for patches, and none for the tiles of regions and slides "
        "(predict prints the mode it runs)",
    )


def build_parser(available: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The full parser: the top level and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="calcinosis", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"calcinosis {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in commands() if available is None else available:
        cmd.add_arguments(
            sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's), run the command, return its exit status."""
    available = commands()
    if not available:
        print(
            f"calcinosis: no commands are registered (entry points {ENTRY_POINT_GROUP!r}); "
            "install the package, e.g. pip install -e .",
            file=sys.stderr,
        )
        return 2
    args = build_parser(available).parse_args(argv)
    cmd = next(c for c in available if c.name == args.command)
    module_name, func_name = cmd.run.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except CalcinosisError as exc:
        print(f"calcinosis {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calcinosis {args.command}: interrupted", file=sys.stderr)
        return 130


def package_version() -> str:
    """The installed calcinosis version (``calcinosis --version``; exports and the page record it)."""
    try:
        return version("calcinosis")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0+unknown"


if __name__ == "__main__":
    # Run as ``python -m calcinosis.model.cli``: this file is then ``__main__``, a second
    # copy whose Command class the registered commands are not instances of; use the real one.
    from calcinosis.model.cli import main as _main

    sys.exit(_main())
