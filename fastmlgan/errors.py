"""Errors a user can cause. The command-line entry points print their message, not a traceback."""


class FastMLGANError(Exception):
    """Base class: the message names the file, field or option to fix."""


class ConfigError(FastMLGANError, ValueError):
    """A bad option, preset or combination of options."""


class DataError(FastMLGANError):
    """A missing, unreadable or malformed dataset file."""
