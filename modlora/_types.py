"""Axis vocabulary and tensor aliases used on public signatures.

Axes: ``batch`` (samples), ``seq`` (positions), ``d_in`` / ``d_out`` (a target layer's input and
output width), ``r`` (adapter rank), ``k`` (number of singular directions, ``min(d_in, d_out)``),
``n`` (calibration rows), ``experts`` (``E``, the experts of a fused MoE weight). ``*lead`` stands for any leading axes (``batch``, ``batch seq``...).
"""

from numbers import Integral, Real

from jaxtyping import Float
from torch import Tensor

Number = Real
"""A real number: ``int``, ``float`` or a NumPy scalar (``numbers.Real``)."""
Count = Integral
"""An integer: ``int`` or a NumPy integer (``numbers.Integral``)."""
Coeff = Number | Float[Tensor, ""] | Float[Tensor, " batch"]
"""A signed coefficient: a number, a 0-d tensor, or one value per sample."""

FactorA = Float[Tensor, "*experts r d_in"]
"""A delta's right factor: ``(r, d_in)``, or ``(E, r, d_in)`` for a fused expert weight."""
FactorB = Float[Tensor, "*experts d_out r"]
"""A delta's left factor: ``(d_out, r)``, or ``(E, d_out, r)`` for a fused expert weight."""
