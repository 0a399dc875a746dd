"""Gradient checkpointing: a recomputed forward sees every adapter as the original forward did.

``torch.utils.checkpoint`` runs a checkpointed segment twice: in the forward, and again during
the backward to rebuild the activations it did not keep. Between the two, code may change an
adapter: ``set_coeff(-c)`` for the second half of the ±c pattern (``+c`` forward,
``set_coeff(-c)``, ``-c`` forward, one backward), ``enabled``, a ``gate``, a detach. So the hooks
*record*, during the original forward of a checkpointed segment, what each adapter did at each
call (whether it added its delta, and with which ``c``), and *replay* those records, in order,
when the segment is recomputed. The gradients are then those of the forward that ran.

How a segment is recognised (both flavours of ``torch.utils.checkpoint``):

* non-reentrant (``use_reentrant=False``, transformers' default): the segment is torch's
  checkpoint frame, reached through the saved-tensor hooks checkpoint installs around the
  original forward and around its recomputation;
* reentrant (``use_reentrant=True``): the segment is the ``CheckpointFunction``'s autograd node.
  Its forward runs with both gradient modes off (a plain ``no_grad`` inference leaves
  forward-mode AD on, which tells them apart) and is found on the Python stack, as is its
  backward, which recomputes.

Records are held weakly by segment: they go away with the autograd graph. A recompute that cannot
be matched to its records raises instead of guessing (:class:`RecomputeError`). Detaching an
adapter whose checkpointed forward still awaits its backward is reported by
:func:`note_detach`: the recompute would run without the adapter's hook.

Not covered: a ``torch.compile``d forward (the coefficient is a graph input read at recompute),
and checkpoint implementations other than ``torch.utils.checkpoint`` (DeepSpeed's, Megatron's):
keep ``c`` fixed between forward and backward there.
"""

import sys
import weakref

import torch
from loguru import logger

from .part import AdapterStateError

State = tuple[bool, object]
"""What an adapter did at one hook call: ``(applied, c)``, ``c`` a float or a ``(batch,)``
tensor (never changed in place: :class:`~modlora.coefficient.Coefficient` replaces it)."""

OFF: State = (False, 0.0)
_MAX_DEPTH = 400  # stack frames searched for a reentrant checkpoint


class RecomputeError(RuntimeError):
    """A checkpointed segment's recomputation cannot be matched to its original forward."""


class _Log:
    """The records of one checkpointed segment: ``{adapter: [State, ...]}`` in call order."""

    __slots__ = ("records", "cursors", "done", "__weakref__")

    def __init__(self) -> None:
        self.records: dict = {}
        self.cursors: dict = {}  # adapter -> (recompute token, next index)
        self.done = False  # recomputed once: the backward has reached it


_LOGS: "weakref.WeakKeyDictionary[object, _Log]" = weakref.WeakKeyDictionary()


def live_state(adapter) -> State:
    """What the adapter does now: off when disabled, gated off or at scalar ``c == 0``."""
    if not adapter.enabled or (adapter.gate is not None and not adapter.gate()):
        return OFF
    coeff = adapter.coefficient
    if coeff.is_zero:
        return OFF
    return True, coeff.snapshot


# ---------------------------------------------------------------------------- segments
def _closure(fn, name: str):
    code = getattr(fn, "__code__", None)
    if code is None or name not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def _saved_tensor_segment(pack) -> tuple[str, object, object] | None:
    """``("forward" | "recompute", frame, token)`` when ``pack`` is non-reentrant checkpoint's."""
    inner = getattr(pack, "__wrapped__", pack)  # the recomputation hook is dynamo-disabled
    if getattr(inner, "__module__", None) != "torch.utils.checkpoint":
        return None
    qualname = getattr(inner, "__qualname__", "")
    if qualname.startswith("_checkpoint_hook."):
        frame = _closure(inner, "frame")
        return None if frame is None else ("forward", frame, None)
    if qualname.startswith("_recomputation_hook."):
        ref = _closure(inner, "target_frame_ref")
        frame = ref() if ref is not None else None
        return None if frame is None else ("recompute", frame, pack)
    return None


def _reentrant_ctx(method: str):
    """The autograd ctx of the innermost ``CheckpointFunction.<method>`` on the stack, or None."""
    checkpoint = sys.modules.get("torch.utils.checkpoint")
    if checkpoint is None:
        return None
    code = getattr(checkpoint.CheckpointFunction, method).__code__
    frame = sys._getframe(2)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            return frame.f_locals.get("ctx")
        frame = frame.f_back
    return None


def _inside_checkpoint() -> bool:
    frame = sys._getframe(2)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == "torch.utils.checkpoint":
            return True
        frame = frame.f_back
    return False


# ---------------------------------------------------------------------------- record / replay
def _record(segment, adapter, state: State) -> None:
    log = _LOGS.get(segment)
    if log is None:
        log = _LOGS[segment] = _Log()
    log.records.setdefault(adapter, []).append(state)


def _replay(segment, adapter, token) -> State:
    log = _LOGS.get(segment)
    records = None if log is None else log.records.get(adapter)
    if records is None:
        if log is None and not _reentrant_forward_is_recognised():
            raise RecomputeError(
                f"{type(adapter).__name__}: this torch ({torch.__version__}) runs an autograd "
                "Function's forward with forward-mode AD on, so modlora cannot record reentrant "
                "checkpointed forwards; use use_reentrant=False"
            )
        return OFF  # not attached when the segment first ran: it added nothing then
    last, index = log.cursors.get(adapter, (None, 0))
    if last is not token and last != token:
        index = 0  # a new recomputation of this segment (another backward)
    if index >= len(records):
        raise RecomputeError(
            f"{type(adapter).__name__}: a checkpointed segment, recomputed in the backward, called "
            f"the adapter's hooks more often ({index + 1}) than its original forward did "
            f"({len(records)}); the segment must run the same layers both times"
        )
    log.cursors[adapter] = (token, index + 1)
    log.done = True  # the backward reached the segment: its recomputation is under way
    return records[index]


_RECOGNISED: list[bool] = []


def _reentrant_forward_is_recognised() -> bool:
    """Whether an autograd Function's forward runs with both gradient modes off (how
    :func:`no_grad_state` tells a reentrant checkpoint's forward from a ``no_grad`` one); probed
    once."""
    if not _RECOGNISED:

        class Probe(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                _RECOGNISED.append(not torch._C._is_fwd_grad_enabled())
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                return grad

        with torch.enable_grad():
            Probe.apply(torch.zeros(1, requires_grad=True))
    return _RECOGNISED[0]


def grad_state(adapter) -> State:
    """The state of a hook call with gradients on: recorded in a checkpointed forward, replayed
    in its recomputation, the live state otherwise."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    found = None if top is None else _saved_tensor_segment(top[0])
    if found is not None:
        what, frame, token = found
        if what == "recompute":
            return _replay(frame, adapter, token)
        state = live_state(adapter)
        _record(frame, adapter, state)
        return state
    task = torch._C._current_graph_task_id()
    if task != -1:  # a forward inside a backward: a reentrant checkpoint recomputing?
        ctx = _reentrant_ctx("backward")
        if ctx is not None:
            return _replay(ctx, adapter, task)
        if _inside_checkpoint():
            raise RecomputeError(
                f"{type(adapter).__name__}: a checkpointed segment is being recomputed but "
                "modlora cannot tell which forward it replays (this torch version's "
                f"torch.utils.checkpoint is not one modlora knows: {torch.__version__}); keep the "
                "adapter's coefficient fixed between forward and backward and report this"
            )
    return live_state(adapter)


def no_grad_state(adapter) -> State:
    """The state of a hook call without gradients, recorded when it is the original forward of a
    reentrant checkpoint (both gradient modes off, not inference mode)."""
    state = live_state(adapter)
    if not torch._C._is_fwd_grad_enabled() and not torch.is_inference_mode_enabled():
        ctx = _reentrant_ctx("forward")
        if ctx is not None:
            _record(ctx, adapter, state)
    return state


def pending(adapter) -> list:
    """Checkpointed segments whose original forward used ``adapter`` and whose backward has not
    run yet (their recomputation needs the adapter's hooks)."""
    return [seg for seg, log in list(_LOGS.items()) if adapter in log.records and not log.done]


def note_detach(adapter) -> None:
    """Called when ``adapter`` is detached: warn if a checkpointed forward that used it awaits its
    backward, and make that backward raise for a reentrant checkpoint (whose recomputation would
    otherwise run without the adapter and leave its gradients ``None``)."""
    segments = pending(adapter)
    if not segments:
        return
    name = type(adapter).__name__
    logger.warning(
        "{} detached while {} gradient-checkpointed forward(s) that used it await their backward: "
        "their recomputation would run without the adapter, so run backward inside the "
        "with-block (or before detach()); that backward raises",
        name,
        len(segments),
    )
    for segment in segments:
        if hasattr(segment, "register_prehook"):  # a reentrant checkpoint's autograd node
            segment.register_prehook(_refuse_if_detached(adapter))


def _refuse_if_detached(adapter):
    ref = weakref.ref(adapter)

    def check(*_):
        adapter = ref()
        if adapter is not None and not adapter.attached:
            raise AdapterStateError(
                f"{type(adapter).__name__} was detached (its with-block left) after a "
                "gradient-checkpointed forward and before its backward: the recomputation runs "
                "without the adapter, so its gradients would be missing. Run backward inside "
                "the with-block"
            )

    return check
