"""One ``.safetensors`` file per adapter: format v1, strict loading, and the seed's legacy format.

=================  ======================================================================
module             what
=================  ======================================================================
``digest``         tensor digests (integrity) and base-weight fingerprints (v1, v2)
``io``             safe reads: every header field checked, integrity verified
``write``          the one atomic file writer and folder writer (manifest, swap, cleanup)
``spec``           format v1 both ways: metadata written, :class:`~.spec.Spec` parsed
``legacy``         the seed's format, parsed into the same :class:`~.spec.Spec`
``metadata``       :func:`read_metadata`: a file's metadata decoded, tensors not loaded
``validate``       checks before anything is built: tensors, model fit, base weights
``load``           :func:`load_adapter`: validate, then the kind's ``rebuild``
``save``           :func:`save_adapter`
``factors``        :func:`read_factors`: file → factors at ``c``, no model
=================  ======================================================================

Every reader (load, offline merge, resume) goes through ``load.read_spec`` and
``validate.check_tensors``; every kind-specific step goes through the kind registry.
"""

from ..digest import sample_fingerprint, weight_fingerprint
from .factors import AdapterFactors, read_factors
from .folder import write_folder
from .io import CheckpointError
from .load import load_adapter, read_spec
from .metadata import read_metadata
from .save import save_adapter
from .spec import FORMAT_VERSION
from .validate import BaseCheck
from .write import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "AdapterFactors",
    "BaseCheck",
    "CheckpointError",
    "atomic_write",
    "load_adapter",
    "read_factors",
    "read_metadata",
    "read_spec",
    "sample_fingerprint",
    "save_adapter",
    "weight_fingerprint",
    "write_folder",
]
