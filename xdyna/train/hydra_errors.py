"""One line for each way Hydra refuses a command line, naming the override and the fix.

Hydra composes the config before any xdyna code runs, and on its own prints a multi-line
report (search path, "Set the environment variable HYDRA_FULL_ERROR=1 ...") with exit status 1.
``xdyna-train`` and ``xdyna-launch`` turn those errors into the project's contract for bad input
(one line, exit status 2) with :func:`describe_config_error`.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# Where a value holding characters of Hydra's override grammar (braces, commas, spaces, brackets)
# needs quoting, this form survives both the shell and Hydra's parser.
QUOTING_HINT = "quote the value for Hydra inside the shell's quotes, e.g. data.shards=\"'/data/train-{000000..000999}.tar'\""


def _first_line(text: object) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _override_setting(overrides: Sequence[str], key: str) -> str:
    """The override that sets ``key`` (as typed), else ``key`` itself."""
    for override in overrides:
        name = override.split("=", 1)[0].lstrip("+~")
        if name == key:
            return override
    return key


def _unparsable_override(overrides: Sequence[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


def _config_file(error: BaseException) -> str | None:
    """``conf/<group>/<option>.yaml`` when Hydra failed while merging that file (its message
    starts ``In '<group>/<option>':``), else ``None`` (an override on the command line)."""
    match = re.match(r"In '([^']+)':", str(error))
    return f"conf/{match.group(1)}.yaml" if match else None


def _schema_name(node) -> str | None:
    """``module.Class`` of the dataclass that types ``node`` (xdyna/train/schema.py), else None."""
    object_type = getattr(getattr(node, "_metadata", None), "object_type", None)
    if object_type is None or object_type is dict:
        return None
    return f"{object_type.__module__}.{object_type.__qualname__}"


def describe_config_error(error: BaseException, overrides: Sequence[str]) -> str | None:
    """One line for a config composition error, or ``None`` when ``error`` is not one."""
    if isinstance(error, MissingConfigException):
        if error.options is None:  # the primary config (--config-name) itself
            return _first_line(error)
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return (f"{group}={option}: no such option{_suggest(option, error.options)}; "
                f"choose one of {', '.join(error.options)}")
    if isinstance(error, OverrideParseException):
        culprit = _unparsable_override(overrides)
        where = f"cannot parse override {culprit!r}" if culprit else "cannot parse the overrides"
        return f"{where} ({_first_line(error)}); {QUOTING_HINT}"
    # An override's error is the exception's cause; a config file's (Hydra re-raises while
    # handling it) its context.
    cause = error.__cause__ or error.__context__
    config_file = _config_file(error)
    if isinstance(error, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = str(cause.full_key)
        parent = cause.parent_node
        known = [str(k) for k in parent.keys()] if parent is not None else []
        leaf = key.rpartition(".")[2]
        section = key.rpartition(".")[0] or "the config"
        schema = _schema_name(parent)
        # A node typed by a schema takes its dataclass's fields only ('+' cannot add one there).
        hint = f"the fields of {schema}" if schema else "a new key needs a leading '+'"
        where = config_file or _override_setting(overrides, key)
        return (f"{where}: {section} has no key {leaf!r}{_suggest(leaf, known)}; "
                f"keys: {', '.join(known)} ({hint})")
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        if isinstance(cause, OmegaConfBaseException):
            key = getattr(cause, "full_key", None)
            detail = f": {key + ': ' if key and config_file else ''}{_first_line(cause)}"
        else:
            detail = ""
        # A file's error: "conf/<file>.yaml: <key>: <what>" instead of Hydra's "In '<file>': X raised ...:".
        head = config_file if config_file and detail else _first_line(error)
        return f"{head}{detail}"
    return None
