"""The one check every input file path goes through, for the models' weight loaders and the
pipeline's inputs alike.

Every check fails loudly with the path and what was expected: the public release silently loaded
other weights when a path was a folder.
"""

from __future__ import annotations

from pathlib import Path

from .errors import XDynaUserError


class InputError(XDynaUserError, ValueError):
    """An input file or value that cannot be used; the message names it."""


def require_file(path: str | Path, what: str, config_key: str | None = None,
                 error: type[XDynaUserError] = InputError) -> Path:
    """``path`` as a Path after checking it is an existing, non-empty regular file.

    ``what`` says what the file should be; ``config_key`` (when the path came from a config) leads
    the message; ``error`` is the exception class raised.
    """
    file = Path(path).expanduser()
    if config_key is None:
        subject, expected = f"{what} {str(file)!r}", ""
    else:
        subject, expected = f"{config_key}: {str(file)!r}", f" (expected {what})"
    if not file.exists():
        raise error(f"{subject} does not exist{expected}")
    if file.is_dir():
        raise error(f"{subject} is a folder, expected a file{expected}")
    if file.stat().st_size == 0:
        raise error(f"{subject} is empty (0 bytes){expected}")
    return file
