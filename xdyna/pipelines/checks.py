"""The pipeline's input error and the file check every path goes through.

Kept apart from video decoding so that the sampling code and :class:`XDynaPipeline` import
without the video stack. Every check fails loudly with the path and what was expected: the
public release silently loaded other weights when a path was a folder.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import XDynaUserError


class InputError(XDynaUserError, ValueError):
    """An input file or value the pipeline cannot use; the message names it."""


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path after checking it is an existing, non-empty regular file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"{what} {str(file)!r} does not exist")
    if file.is_dir():
        raise InputError(f"{what} {str(file)!r} is a folder, expected a file")
    if file.stat().st_size == 0:
        raise InputError(f"{what} {str(file)!r} is empty (0 bytes)")
    return file
