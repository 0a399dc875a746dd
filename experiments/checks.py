"""Start-up errors of a config: :class:`ConfigError` and the range checks that name their key."""

import math


class ConfigError(ValueError):
    """A config value is unusable; the message starts with its key."""


def bounded(key: str, value, lo=None, hi=None, lo_open: bool = False):
    """``value`` (already a number) finite and within ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {value!r}")
    return value


def one_of(key: str, value, choices) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key> <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {message}")
