"""Reading real weights from local folders. Never downloads: a missing path is a clear error."""

from __future__ import annotations

from pathlib import Path

from ..errors import XDynaUserError


class PretrainedNotFoundError(XDynaUserError, FileNotFoundError):
    """A configured weights path does not exist or lacks what it should hold."""


def require_folder(path: str | Path, what: str, config_key: str, must_contain: tuple[str, ...] = ()) -> Path:
    """Return ``path`` as a Path after checking it is a folder holding ``must_contain``.

    The message names the config key, the path and what the folder should be, because this is the
    first thing a user sees when a cluster job points at the wrong place.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} does not exist (expected {what})")
    if not folder.is_dir():
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} is a file, expected a folder ({what})")
    missing = [name for name in must_contain if not (folder / name).exists()]
    if missing:
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} lacks {missing} (expected {what})")
    return folder
