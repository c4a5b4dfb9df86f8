"""Slide paths from the page, resolved inside ``--slides`` or refused.

The page names a slide by its path relative to the slides folder. Nothing the
client sends is ever opened outside that folder: absolute paths, ``..``
components, backslashes and NUL bytes are refused before the file system is
touched, and the resolved path (symlinks followed) must still lie inside the
folder, so a symlink pointing out of it is refused too.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from calcinosis.inference.slide import SLIDE_EXTENSIONS


class SlidePathError(Exception):
    """A slide path the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resolve_slide(root: Path, rel: str) -> Path:
    """The file ``rel`` names under ``root`` (resolved), or :class:`SlidePathError`.

    400: not a plain relative path (empty, absolute, ``..``, backslash, NUL) or
    not a slide file type; 403: it resolves outside ``root`` (a symlink out);
    404: no such file.
    """
    text = str(rel or "")
    if not text.strip():
        raise SlidePathError(400, "no slide path given; pick a slide from the list")
    if "\x00" in text or "\\" in text:
        raise SlidePathError(
            400, f"slide path {text!r} contains a NUL byte or a backslash; use '/' between folders"
        )
    pure = PurePosixPath(text)
    if pure.is_absolute() or text.startswith("~") or (len(text) > 1 and text[1] == ":"):
        raise SlidePathError(
            400,
            f"slide path {text!r} is absolute; give a path relative to the slides folder "
            "(as the slide list shows it)",
        )
    if any(part == ".." for part in pure.parts):
        raise SlidePathError(
            400,
            f"slide path {text!r} contains '..'; only slides inside the slides folder are served",
        )
    if pure.suffix.lower() not in SLIDE_EXTENSIONS:
        raise SlidePathError(
            400,
            f"{pure.name!r} is not a whole-slide file type this server reads "
            f"({', '.join(sorted(SLIDE_EXTENSIONS))})",
        )
    base = root.resolve()
    candidate = base.joinpath(*pure.parts)
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise SlidePathError(404, f"no slide {text!r} in the slides folder") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise SlidePathError(400, f"slide path {text!r} cannot be resolved ({exc})") from None
    if not real.is_relative_to(base):
        raise SlidePathError(
            403, f"slide path {text!r} leads outside the slides folder (a link out); refused"
        )
    if not real.is_file():
        raise SlidePathError(400, f"slide path {text!r} is not a file")
    return real


def list_slides(root: Path, limit: int = 5000) -> list[dict[str, object]]:
    """Slide files under ``root`` (relative POSIX paths, sorted), at most ``limit``.

    Symlinked folders are not followed; a symlinked file is listed only when
    it resolves inside ``root``, the same rule :func:`resolve_slide` applies.
    """
    base = root.resolve()
    found: list[dict[str, object]] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.suffix.lower() not in SLIDE_EXTENSIONS:
                continue
            try:
                real = p.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if not real.is_relative_to(base) or not real.is_file():
                continue
            rel = p.relative_to(base).as_posix()
            found.append({"path": rel, "bytes": real.stat().st_size})
            if len(found) >= limit:
                return found
    return sorted(found, key=lambda d: str(d["path"]).lower())
