"""modlora: modulated low-rank adapters scaled at run time by a signed coefficient ``c``.

Every adapter kind is a low-rank delta ``ΔW(c) = B(c) @ A`` per target layer; hooks, merge,
history, export and checkpoints share that one path.
"""

from .calibration import Calibration, collect_calibration
from .coefficient import validate_coeff
from .history import HistoryBake, PiSSAHistoryBake
from .hooks import AdapterStateError, LowRankAdapter
from .layout import DEFAULT_EXCLUDE, Target, TargetLayout, find_block_list, find_targets
from .lora import ModulatedLoRA
from .pissa import SELECTION_SCORES, ModulatedPiSSA
from .ranks import check_rank_vector, infer_rank, infer_ranks

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "SELECTION_SCORES",
    "AdapterStateError",
    "Calibration",
    "HistoryBake",
    "LowRankAdapter",
    "ModulatedLoRA",
    "ModulatedPiSSA",
    "PiSSAHistoryBake",
    "Target",
    "TargetLayout",
    "__version__",
    "check_rank_vector",
    "collect_calibration",
    "find_block_list",
    "find_targets",
    "infer_rank",
    "infer_ranks",
    "validate_coeff",
]
