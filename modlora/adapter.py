"""``LowRankAdapter``: the ``nn.Module`` every adapter kind is, and its lifetime.

An adapter owns one :class:`~modlora.part.TargetPart` per target layer, in a tree under
``adapter.parts`` that mirrors the model's module names, so ``adapter.state_dict()`` keys read
``parts.<target name>.<role>``. While attached (``attach`` or a ``with`` block) each part is also
registered in its target layer as ``layer.<slot>`` (``modlora_lora``, ``modlora_pissa``, … with a
number appended when taken), and a :class:`~modlora.hooks.DeltaHook` on the layer adds its delta:
``model.parameters()`` then yields the very same ``Parameter`` objects as
``adapter.parameters()``, so DDP, FSDP2, accelerate, the HF Trainer and any optimizer built from
the model train them. ``detach`` removes both; the model's ``state_dict`` keys are then exactly
the base keys again. (Saving the model's ``state_dict`` while attached therefore includes the
adapter's tensors under ``<layer>.<slot>.<role>``: detach first to save the plain base.)

The kind protocol every subclass implements is :class:`~modlora.kinds.AdapterKind`.

Compiled models see adapters attach and detach (:func:`~modlora.hooks.let_compiled_code_see_hooks`).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ._types import Coeff, FactorA, FactorB
from .applied import refuse_double_delta
from .checkpoint import load_adapter, save_adapter
from .coefficient import Coefficient, validate_coeff
from .experts import ExpertsDeltaHook
from .hooks import DeltaHook, let_compiled_code_see_hooks
from .install import check_materialised, check_parallel, free_slot, install, uninstall
from .kinds import AdapterKind
from .layout import TargetLayout, unwrap_model
from .part import AdapterStateError, Parts, TargetPart
from .recompute import note_detach
from .samples import BatchShape


def describe_model(model: nn.Module) -> str:
    return f"{type(model).__name__} at {id(model):#x}"


class LowRankAdapter(AdapterKind, nn.Module):
    """Base class: an adapter whose delta on each target is ``c · scale · B @ A``.

    A kind subclasses it, implements :class:`~modlora.kinds.AdapterKind`, is ``@register_kind``.

    Attributes:
        layout: the :class:`~modlora.layout.TargetLayout` the adapter was built on.
        parts: the per-target parts, in a tree mirroring the model's module names.
        coefficient: the run-time ``c`` (see :meth:`set_coeff`).
        enabled: an on/off switch read by every hook call (``False`` → base output).
        gate: optional callable; when set, the hooks add the delta only while it returns True.
        deployed_c: the calibrated ``c`` stored with a checkpoint.
        extra_meta: the user's metadata stored with a checkpoint.
        attach_guards: callables run with the adapter at the start of ``attach``; one raises to
            refuse (a copy of this delta is already in the model).
    """

    def __init__(self, model: nn.Module, layout: TargetLayout) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"an adapter needs an nn.Module, got {type(model).__name__}")
        super().__init__()
        self.__dict__["_model"] = unwrap_model(model)  # not a submodule
        self.layout = layout
        self.parts = Parts()
        self.coefficient = Coefficient(1.0)
        self.enabled = True
        self.gate = None
        self.deployed_c: float | None = None
        self.extra_meta: dict = {}
        self.attach_guards: list = [refuse_double_delta]
        self._slot: str | None = None
        self._hooks: tuple | None = None
        self._handles: list = []
        self.batch_shape = BatchShape()  # the model input's (batch, seq), for per-sample c
        self.eval()

    # ------------------------------------------------------------------ parts
    def add_part(self, part: TargetPart) -> None:
        """Put ``part`` in the ``parts`` tree under its target's name."""
        target = self.layout[part.name]
        part.routed, part.transposed = target.routed, target.transposed
        self.parts.add(part)
        part.bind(self)
        part.train(self.training)

    def part(self, name: str) -> TargetPart:
        """The part of target ``name``."""
        return self.parts[name]

    def named_parts(self) -> Iterator[tuple[str, TargetPart]]:
        """``(target name, part)`` in model order."""
        yield from self.parts.items()

    def target_tensors(self) -> dict[str, dict[str, Tensor]]:
        """``{target: {role: tensor}}`` (the live tensors, not copies)."""
        return self.parts.tensors()

    def load_target_tensors(self, tensors) -> None:
        """Copy ``{target: {role: tensor}}`` in place, every tensor checked first (see
        :meth:`~modlora.part.Parts.load`)."""
        self.parts.load(tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the adapter's tensors: the constructor's ``dtype`` until torch's own
        ``.to()`` / ``.half()`` / ``.double()`` (or a cast of the model while attached) changes
        it. A checkpoint records this one, so the file matches the tensors it holds."""
        return self.parts.dtype(default=self.__dict__.get("_dtype", torch.float32))

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.__dict__["_dtype"] = value

    def ranks(self) -> dict[str, int]:
        """``{target name: rank}``."""
        return {name: part.rank for name, part in self.named_parts()}

    def reset_parameters(self) -> None:
        """Give every part its initial values (after ``to_empty`` on a meta-built adapter)."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to initialise")

    # ------------------------------------------------------------------ factors
    @torch.no_grad()
    def delta_factors(self, c: Coeff = 1.0) -> dict[str, tuple[FactorA, FactorB]]:
        """The delta at coefficient ``c`` as factors, ``{target name: (A, B)}``, ``ΔW = B @ A``.

        ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)`` with ``c`` and the scale folded in, both
        float32, detached, on the target's device, in the logical ``(d_out, d_in)`` orientation
        (also for GPT-2 ``Conv1D``, whose weight is stored transposed). Under FSDP2 the shards
        are gathered, so every rank must call it.
        """
        value = validate_coeff(c)
        if not isinstance(value, float):
            raise ValueError("delta_factors needs a scalar c (a merged weight has one delta)")
        out = {}
        for name, part in self.named_parts():
            a, b, scale = part.full_factors()  # FSDP2 shards are gathered: a collective
            out[name] = (a.float().clone(), b.float() * (value * scale))
        return out

    # ------------------------------------------------------------------ coefficient
    @property
    def c(self) -> float | Tensor:
        """The current coefficient (a float, or a ``(batch,)`` tensor)."""
        return self.coefficient.value

    def scalar_c(self, c: Coeff | None, what: str) -> float:
        """``c`` as one float for a merge or an export; ``None`` means :attr:`deployed_c`.

        Raises:
            ValueError: ``c`` is None and no deployed c is stored, or ``c`` is per-sample.
        """
        if c is None:
            if self.deployed_c is None:
                raise ValueError("c=None uses the adapter's deployed_c, but it has none; pass c")
            c = self.deployed_c
        value = validate_coeff(c)
        if not isinstance(value, float):
            raise ValueError(f"{what} needs a scalar c: it holds one delta")
        return value

    def set_coeff(self, c: Coeff) -> None:
        """Change ``c`` in place (no re-attach, no recompilation of a compiled model).

        Args:
            c: a finite number, or a finite ``(batch,)`` tensor of per-sample coefficients.
        """
        self.coefficient.set(c)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, extra_meta: dict | None = None, c: Coeff | None = None):
        """Write the adapter to one ``.safetensors`` file (see :mod:`modlora.checkpoint`).

        Args:
            path: destination file (written atomically).
            extra_meta: JSON-serialisable user metadata.
            c: the calibrated / deployed coefficient to record.
        """
        return save_adapter(self, path, extra_meta=extra_meta, c=c)

    @classmethod
    def from_checkpoint(cls, model: nn.Module, path, **kwargs) -> "LowRankAdapter":
        """Rebuild an adapter of this kind from a file written by :meth:`save` (in eval mode)."""
        return load_adapter(model, path, expect=cls, **kwargs)

    # ------------------------------------------------------------------ lifetime
    @property
    def model(self) -> nn.Module:
        """The model the adapter was built on."""
        return self._model

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def check_model(self, model: nn.Module) -> nn.Module:
        """Raise unless ``model`` (or the model inside a compile / DDP wrapper) is the one this
        adapter was built on; returns the plain model."""
        plain = unwrap_model(model) if isinstance(model, nn.Module) else model
        if plain is not self._model:
            raise ValueError(
                f"{type(self).__name__} was built on {describe_model(self._model)}, "
                f"not on the {describe_model(model)} passed here"
            )
        return plain

    def attach(self, model: nn.Module, c: Coeff = 1.0) -> "LowRankAdapter":
        """Register the parts and hooks in the model (persistent form); ``detach()`` removes them.

        Raises:
            AdapterStateError: already attached, tensors never materialised, one of
                ``attach_guards`` refused, or DDP / FSDP2 took the model's parameters before
                this adapter's were in it (attach first, then wrap or ``fully_shard``).
            ValueError: ``model`` is not the one the adapter was built on, or ``c`` is invalid.
        """
        self.check_model(model)
        if self.attached:
            raise AdapterStateError(
                f"{type(self).__name__} is already attached to {describe_model(self._model)}; "
                "detach() it (or leave its with-block) before attaching again"
            )
        value = validate_coeff(c)
        for guard in self.attach_guards:
            guard(self)
        check_materialised(self.layout, self.parts, type(self).__name__)
        check_parallel(model, self.layout, self.parts, type(self).__name__)
        let_compiled_code_see_hooks()
        self.coefficient.set(value)
        for target in self.layout:
            self.coefficient.on(target.device)  # every device's tensor now, not while tracing
        slot = free_slot(self.layout, f"modlora_{self.kind}")
        if self._hooks is None or self._hooks[0].slot != slot:  # the same hook objects each
            self._hooks = (DeltaHook(slot), ExpertsDeltaHook(slot))  # time: graphs are reused
        self._handles = install(self.layout, self.parts, self._hooks, self._model, self.batch_shape)
        self._slot = slot
        return self

    def detach(self) -> None:
        """Remove the hooks and the parts from the model.

        Raises:
            AdapterStateError: not attached.
        """
        if not self.attached:
            raise AdapterStateError(f"{type(self).__name__} is not attached")
        uninstall(self.layout, self._slot, self._handles)
        self._handles, self._slot = [], None
        let_compiled_code_see_hooks()
        note_detach(self)  # a checkpointed forward still awaiting its backward needs the hooks

    @contextmanager
    def _attached(self, model: nn.Module, c: Coeff) -> Iterator["LowRankAdapter"]:
        self.attach(model, c)
        try:
            yield self
        finally:
            self.detach()

    def __call__(self, model: nn.Module, c: Coeff = 1.0):
        """``with adapter(model, c=1.5): ...`` — hooks on entry, removed on exit (also on errors).

        The model and ``c`` are checked here, before the block is entered.
        """
        self.check_model(model)
        if self.attached:
            raise AdapterStateError(
                f"{type(self).__name__} is already attached; a with-block cannot re-enter it"
            )
        validate_coeff(c)  # now, not on entry
        return self._attached(model, c)

    def forward(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is not called on inputs: attach it to its model "
            "(`with adapter(model, c=...)` or adapter.attach(model, c)) and call the model"
        )

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo: dict) -> "LowRankAdapter":
        """A copy of the model copies its attached adapter (hooks and all); a copy of the adapter
        alone is a detached adapter on the same base model."""
        model = self._model
        with_model = id(model) in memo
        if not with_model:
            for module in model.modules():
                if not isinstance(module, TargetPart):
                    memo.setdefault(id(module), module)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if not with_model and key == "_handles":
                new.__dict__[key] = []
            elif not with_model and key == "_slot":
                new.__dict__[key] = None
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new
