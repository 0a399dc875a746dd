"""modlora: modulated low-rank adapters scaled at run time by a signed coefficient ``c``.

Every adapter kind is a low-rank delta ``ΔW(c) = B(c) @ A`` per target layer; hooks, merge,
history, export and checkpoints share that one path.
"""

from .calibration import Calibration, collect_calibration
from .checkpoint import CheckpointError, load_adapter, read_metadata, save_adapter
from .coefficient import validate_coeff
from .history import HistoryBake, PiSSAHistoryBake
from .hooks import AdapterStateError, LowRankAdapter
from .layout import DEFAULT_EXCLUDE, Target, TargetLayout, find_block_list, find_targets
from .lora import ModulatedLoRA
from .merge import MergeError, MergeReport, merge, unmerge
from .merge_checkpoint import merge_checkpoint
from .peft import export_peft, import_peft
from .pissa import SELECTION_SCORES, ModulatedPiSSA, tail_depth
from .ranks import check_rank_vector, infer_rank, infer_ranks
from .training_state import fork_training, resume_training, save_training_state

__version__ = "0.1.0"

__all__ = [
    "AdapterStateError",
    "Calibration",
    "CheckpointError",
    "DEFAULT_EXCLUDE",
    "HistoryBake",
    "LowRankAdapter",
    "MergeError",
    "MergeReport",
    "ModulatedLoRA",
    "ModulatedPiSSA",
    "PiSSAHistoryBake",
    "SELECTION_SCORES",
    "Target",
    "TargetLayout",
    "__version__",
    "check_rank_vector",
    "collect_calibration",
    "export_peft",
    "find_block_list",
    "find_targets",
    "fork_training",
    "import_peft",
    "infer_rank",
    "infer_ranks",
    "load_adapter",
    "merge",
    "merge_checkpoint",
    "read_metadata",
    "resume_training",
    "save_adapter",
    "save_training_state",
    "tail_depth",
    "unmerge",
    "validate_coeff",
]
