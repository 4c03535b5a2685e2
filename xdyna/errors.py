"""Errors that mean "the user's input is wrong" (config, paths, checkpoints).

Entry points print these as one line naming the culprit and exit with status 2; anything else is
a bug and keeps its traceback.
"""


class XDynaUserError(Exception):
    """Base class of input errors reported without a traceback."""


class ConfigError(XDynaUserError, ValueError):
    """A configuration value is invalid."""


def is_integer(value, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least ``minimum``: the check every
    count in a config gets before its one-line ``must be an integer >= minimum`` error."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
