"""Files published under their final name only when complete, with the mode the umask gives.

Writers that go through a temporary file (ours, and safetensors >= 0.5, whose ``save_file``
persists a ``NamedTempFile``) end up with the temporary file's mode, 0600, instead of what a
plain ``open()`` would give (0644 under umask 022): other users of a shared run folder could not
read the exports. Every writer of shards, exports, samples and pipelines goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``os.umask`` alone can
    only be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def give_normal_mode(path: str | os.PathLike) -> None:
    """Set ``path`` to :func:`normal_file_mode` (a temporary file's 0600 undone)."""
    os.chmod(path, normal_file_mode())


def publish(temporary: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Give the complete ``temporary`` file the normal mode, then rename it to ``final``
    (atomic on one filesystem: a reader never sees half a file under the final name)."""
    give_normal_mode(temporary)
    os.replace(temporary, final)
    return Path(final)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A hidden name beside ``path`` (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    temporary = temporary_sibling(path)
    try:
        Path(temporary).write_bytes(data)
        return publish(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (itself atomic through a temporary file) with the normal mode."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    give_normal_mode(path)
    return Path(path)
