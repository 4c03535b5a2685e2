"""The pipeline's input error and the file check every path goes through.

Kept apart from video decoding so that the sampling code and :class:`XDynaPipeline` import
without the video stack. Both live in :mod:`xdyna.paths`, shared with the models' weight loaders.
"""

from __future__ import annotations

from ..paths import InputError, require_file

__all__ = ["InputError", "require_file"]
