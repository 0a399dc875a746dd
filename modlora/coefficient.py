"""The run-time coefficient ``c``: a float or one value per sample, kept in tensors updated in place.

One 0-d (or ``(batch,)``) tensor per device the adapter lives on, so each hook reads ``c`` on its
own layer's device, and a Python mirror of scalar values, so the ``c == 0`` shortcut never reads a
tensor (no GPU sync). Updating in place keeps the tensor's identity, so a ``torch.compile``d
model is not recompiled when only ``c`` changes. The tensors are always ordinary tensors (made
outside inference mode), so an adapter first used under ``torch.inference_mode()`` works outside
it too.
"""

import math
from numbers import Real

import torch

from ._types import Coeff
from .checks import scalar

FLOAT32_MAX = torch.finfo(torch.float32).max
"""The largest ``|c|``: the coefficient's tensors are float32."""


def validate_coeff(c: Coeff) -> float | torch.Tensor:
    """Check ``c`` and return it as a float or a 1-D float tensor.

    A NumPy scalar, a 0-d array or a 0-d tensor means the number it holds; a 1-D NumPy array
    means the same as a 1-D tensor.

    Raises:
        TypeError: not a real number or a real tensor (a bool, a complex number, a string...).
        ValueError: non-finite or too large values, a tensor on the meta device (no values), or
            a tensor that is neither 0-d nor ``(batch,)``.
    """
    if isinstance(c, torch.Tensor):
        if c.is_complex() or c.dtype == torch.bool:
            raise TypeError(f"coefficient c must be a real number, got a {c.dtype} tensor")
        if c.device.type == "meta":
            raise ValueError("coefficient c is a tensor on the meta device: it holds no value")
    elif getattr(c, "ndim", None) == 1 and hasattr(c, "__array__"):
        c = torch.as_tensor(c.__array__())  # a (batch,) NumPy array
    value = scalar(c)
    if isinstance(value, bool) or (
        not isinstance(value, Real) and not isinstance(value, torch.Tensor)
    ):
        raise TypeError(
            f"coefficient c must be a float or a (batch,) tensor, got {type(c).__name__}"
        )
    if isinstance(value, Real):
        try:
            out = float(value)
        except OverflowError:
            out = math.inf
        if not math.isfinite(out):
            raise ValueError(f"coefficient c must be finite, got {value!r:.60}")
        if abs(out) > FLOAT32_MAX:  # c is kept in float32 tensors: it would become inf there
            raise ValueError(f"coefficient c must be finite in float32 (|c| <= 3.4e38), got {out}")
        return out
    c = value
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"per-sample coefficient c must have shape (batch,), got {tuple(c.shape)}")
    if c.dtype == torch.bool or c.is_complex():
        raise TypeError(f"coefficient c must be real numbers, got a {c.dtype} tensor")
    if not c.dtype.is_floating_point:
        c = c.float()
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"coefficient c must be finite, got {c.tolist()}")
    if bool((c.abs() > FLOAT32_MAX).any()):
        raise ValueError(
            f"coefficient c must be finite in float32 (|c| <= 3.4e38), got {c.tolist()}"
        )
    return c.detach()


class Coefficient:
    """Holds ``c`` for one adapter; hooks read it with :meth:`on`."""

    def __init__(self, value: Coeff = 1.0) -> None:
        self._tensors: dict[torch.device, torch.Tensor] = {}
        self._scalar: float | None = None
        self._per_sample: torch.Tensor | None = None
        self.set(value)

    def set(self, c: Coeff) -> None:
        """Validate and store ``c``, updating every device's tensor in place when shapes agree."""
        value = validate_coeff(c)
        if isinstance(value, float):
            self._scalar, self._per_sample = value, None
        else:  # a copy of its own, never written in place: snapshots may keep it
            self._scalar, self._per_sample = None, value.clone()
        with torch.inference_mode(False), torch.no_grad():
            for device, tensor in list(self._tensors.items()):
                self._tensors[device] = self._write(tensor, device)

    def _write(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if self._scalar is not None:
            if tensor is None or tensor.dim() != 0:
                return torch.tensor(self._scalar, dtype=torch.float32, device=device)
            return tensor.fill_(self._scalar)
        source = self._per_sample
        if tensor is None or tensor.shape != source.shape:
            return source.to(device=device, dtype=torch.float32, copy=True)
        return tensor.copy_(source)

    @property
    def value(self) -> float | torch.Tensor:
        """The coefficient: a float, or a ``(batch,)`` tensor (a copy)."""
        return self._scalar if self._scalar is not None else self._per_sample.clone()

    @property
    def snapshot(self) -> float | torch.Tensor:
        """The coefficient as it is now, kept valid by later updates (no copy: a per-sample
        tensor is replaced, never written in place, by :meth:`set`)."""
        return self._scalar if self._scalar is not None else self._per_sample

    @property
    def scalar(self) -> float | None:
        """The scalar value as a Python float, or ``None`` for a per-sample coefficient."""
        return self._scalar

    @property
    def is_zero(self) -> bool:
        """Scalar ``c == 0`` (read from the Python mirror, no device sync)."""
        return self._scalar == 0.0

    def on(self, device: torch.device) -> torch.Tensor:
        """``c`` on ``device`` (0-d or ``(batch,)``); the same tensor object across updates."""
        tensor = self._tensors.get(device)
        if tensor is None:
            with torch.inference_mode(False), torch.no_grad():
                tensor = self._tensors[device] = self._write(None, device)
        return tensor
