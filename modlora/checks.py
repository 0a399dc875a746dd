"""Argument checks shared by the adapters' constructors and the checkpoint metadata parser.

Each returns the value in its canonical Python type and raises ``TypeError`` / ``ValueError``
naming the argument. What a user naturally passes means the same as its Python equivalent: a
NumPy scalar or a 0-d tensor is a number, a ``torch.dtype`` or its name is a dtype.
"""

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

import torch


def invalid(kind: type[Exception], name: str, message: str) -> Exception:
    """An exception whose ``argument`` attribute names the argument (a metadata key)."""
    err = kind(message)
    err.argument = name.split("[", 1)[0]
    return err


def scalar(value):
    """A NumPy scalar, a 0-d array or a 0-d tensor as the Python number it holds (else as is)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.device.type != "meta":
            return value.item()
        return value
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def number(value, name: str) -> float:
    """A finite real number (not a bool)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise invalid(TypeError, name, f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise invalid(ValueError, name, f"{name} must be finite, got {value!r:.60}")
    return out


def positive_number(value, name: str) -> float:
    """A finite number > 0."""
    value = number(value, name)
    if value <= 0:
        raise invalid(ValueError, name, f"{name} must be a positive finite number, got {value!r}")
    return value


def positive_int(value, name: str) -> int:
    """An int > 0 (not a bool, not a float)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise invalid(ValueError, name, f"{name} must be a positive int, got {value!r}")
    return int(value)


def probability(value, name: str) -> float:
    """A number in ``[0, 1)``."""
    value = number(value, name)
    if not 0.0 <= value < 1.0:
        raise invalid(ValueError, name, f"{name} must be in [0, 1), got {value!r}")
    return value


def one_of(value, choices: Sequence, name: str):
    """One of ``choices``."""
    if not isinstance(value, str | int | float | type(None)) or value not in choices:
        raise invalid(ValueError, name, f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def float_dtype(value, name: str) -> torch.dtype:
    """A floating ``torch.dtype`` (or its name, ``"float32"``)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise invalid(ValueError, name, f"{name} must be a floating torch dtype, got {value!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def per_target(value, name: str, check) -> dict:
    """A ``{target name: value}`` mapping whose values pass ``check(value, label)``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise invalid(TypeError, name, f"{name} must map target names to values, got {value!r}")
    return {k: check(v, f"{name}[{k!r}]") for k, v in value.items()}


def json_object(value, name: str) -> dict:
    """A JSON object that comes back from a JSON round trip exactly as given.

    ``str`` keys; values ``None``, bools, ints, finite floats, strings, lists and such objects.
    NumPy scalars and 0-d tensors become the Python number they hold. Anything that would come
    back changed or not at all (a tuple, a set, a non-``str`` key, NaN, an object) raises
    ``TypeError`` (``ValueError`` for a non-finite number) naming where it is.
    """
    if not isinstance(value, Mapping):
        raise invalid(TypeError, name, f"{name} must be a dict, got {type(value).__name__}")
    return _json(value, name)


def _json(value, where: str):
    value = scalar(value)
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return number(value, where)
    if isinstance(value, list):
        return [_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise invalid(
                    TypeError,
                    where,
                    f"{where} has the key {k!r} ({type(k).__name__}): JSON keys are strings, so "
                    f"it would come back as {str(k)!r}; use a str key",
                )
            out[k] = _json(v, f"{where}[{k!r}]")
        return out
    what = type(value).__name__
    hint = "; use a list" if isinstance(value, tuple | set | frozenset) else ""
    raise invalid(TypeError, where, f"{where} is a {what}, which JSON cannot store as it is{hint}")
