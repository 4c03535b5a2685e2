"""User code named in configs and command lines as ``"package.module:attribute"``."""
from __future__ import annotations

import importlib
from typing import Any


def import_object(target: str, what: str) -> Any:
    """``"package.module:attribute"`` -> the attribute; a ``ValueError`` names ``what`` and the
    target when it is malformed, its module cannot be imported or lacks the attribute."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} must be 'package.module:attribute', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what}={target!r}: cannot import {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what}={target!r}: module {module_name!r} has no {attribute!r}") from None
