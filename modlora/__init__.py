"""modlora: modulated low-rank adapters scaled at run time by a signed coefficient ``c``.

Every adapter kind is a low-rank delta ``ΔW(c) = B(c) @ A`` per target layer; hooks, merge,
history, export and checkpoints share that one path. Adapters are ``nn.Module``s whose per-target
parts join the model's module tree while attached.
"""

from ._version import __version__
from .adapter import LowRankAdapter
from .blocks import DEFAULT_EXCLUDE, find_block_list
from .calibration import Calibration, collect_calibration
from .checkpoint import CheckpointError, load_adapter, read_metadata, save_adapter
from .coefficient import validate_coeff
from .history import HistoryBake, PiSSAHistoryBake
from .install import find_adapters
from .kinds import KINDS, register_kind
from .layout import TargetLayout, find_targets
from .lora import ModulatedLoRA
from .merge import merge, unmerge
from .merge_check import MergeError, MergeReport
from .merge_checkpoint import merge_checkpoint
from .part import AdapterStateError, TargetPart
from .peft import export_peft
from .peft_import import import_peft
from .pissa import ModulatedPiSSA
from .ranks import check_rank_vector, infer_rank, infer_ranks
from .selection import SELECTION_SCORES, tail_depth
from .target import Target
from .training_state import fork_training, resume_training, save_training_state

__all__ = [
    "AdapterStateError",
    "Calibration",
    "CheckpointError",
    "DEFAULT_EXCLUDE",
    "HistoryBake",
    "KINDS",
    "LowRankAdapter",
    "MergeError",
    "MergeReport",
    "ModulatedLoRA",
    "ModulatedPiSSA",
    "PiSSAHistoryBake",
    "SELECTION_SCORES",
    "Target",
    "TargetLayout",
    "TargetPart",
    "__version__",
    "check_rank_vector",
    "collect_calibration",
    "export_peft",
    "find_adapters",
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
    "register_kind",
    "resume_training",
    "save_adapter",
    "save_training_state",
    "tail_depth",
    "unmerge",
    "validate_coeff",
]
