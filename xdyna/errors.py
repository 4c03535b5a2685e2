"""Errors that mean "the user's input is wrong" (config, paths, checkpoints).

Entry points print these as one line naming the culprit and exit with status 2; anything else is
a bug and keeps its traceback.
"""


class XDynaUserError(Exception):
    """Base class of input errors reported without a traceback."""


class ConfigError(XDynaUserError, ValueError):
    """A configuration value is invalid."""
