"""A saved adapter's delta as factors, without a model: ``read_factors``.

The file is parsed and validated exactly as :func:`~modlora.load_adapter` does (one validation
path for every reader), and the factors come from the stored kind's own pure factor function,
so the offline merge and any other file reader cannot disagree with the hooks.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .._types import Coeff
from ..coefficient import validate_coeff
from .load import read_spec
from .spec import Spec
from .validate import check_tensors


@dataclass(frozen=True)
class AdapterFactors:
    """A saved adapter's delta at one ``c``: ``factors = {target: (A (r, d_in), B (d_out, r))}``
    with ``c`` and the kind's scale folded into ``B`` (float32); ``spec`` the parsed file."""

    path: Path
    kind: str
    c: float
    factors: dict[str, tuple[Tensor, Tensor]]
    spec: Spec


def read_factors(path, c: Coeff | None = 1.0, names: Iterable[str] | None = None) -> AdapterFactors:
    """Read an adapter file's delta factors at ``c``, float32, without a model.

    Args:
        path: a file written by ``adapter.save`` (or a legacy seed file).
        c: the coefficient folded into ``B``; ``None`` uses the stored deployed ``c``.
        names: module names used to undo the legacy ``__`` flattening (default: ``__`` → ``.``).

    Raises:
        CheckpointError: (a ``ValueError``) anything :func:`~modlora.load_adapter` refuses in
            the file itself: unknown kind, unexpected or incomplete tensors, ranks that
            contradict the metadata, non-finite values, malformed metadata.
        ValueError: no usable ``c``.
    """
    spec = read_spec(path, list(names) if names is not None else None)
    check_tensors(spec)
    if c is None:
        if spec.c is None:
            raise ValueError(f"c=None uses the deployed c stored in {spec.path}, but it has none")
        c = spec.c
    value = validate_coeff(c)
    if not isinstance(value, float):
        raise ValueError("merging needs a scalar c")
    factors = {}
    for name, tensors in spec.tensors.items():
        a, b, scale = spec.cls.target_factors(spec.config, name, tensors)
        factors[name] = (a.float(), b.float() * (value * scale))
    return AdapterFactors(spec.path, spec.kind, value, factors, spec)
