"""Axis vocabulary and tensor aliases used on public signatures.

Axes: ``batch`` (samples), ``seq`` (positions), ``d_in`` / ``d_out`` (a target layer's input and
output width), ``r`` (adapter rank), ``k`` (number of singular directions, ``min(d_in, d_out)``),
``n`` (calibration rows). ``*lead`` stands for any leading axes (``batch``, ``batch seq``...).
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

FactorA = Float[Tensor, "r d_in"]
FactorB = Float[Tensor, "d_out r"]
