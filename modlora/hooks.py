"""The one hook machinery every adapter kind shares.

Every adapter is a low-rank delta ``ΔW(c) = B(c) @ A`` per target. A subclass only says how to
get its factors (:meth:`LowRankAdapter.hook_factors`); this module attaches a forward hook per
target that adds ``scale · c · (x @ A.T) @ B.T`` to the layer's output, without materialising
``ΔW``. It also owns the lifetime rules: ``with adapter(model, c=...)`` attaches on entry and
always detaches on exit; ``attach`` / ``set_coeff`` / ``detach`` is the persistent form;
re-entry and a model other than the one the adapter was built on raise.

Hot path. With scalar ``c`` and no gradients each hook runs two kernels: ``h = x @ A.T`` and
``out += h @ B(c).T``, where ``B(c) = c · scale · B`` is a cached copy of ``B`` (remade when ``c``,
the scale or ``B`` — its identity or version counter — changes; dropped on ``detach``) and the
add is fused into ``addmm_`` on the layer's own output when only modlora hooks can have seen it
(else into an out-of-place ``addmm``). With gradients on, the fold is part of the graph and ``c``
enters as a Python number, so ``set_coeff`` between two forwards and one backward is safe; a
per-sample ``c`` scales the rank-``r`` activations instead. While ``torch.compile`` traces, the
hooks run the plain tensor math with ``c`` read from its tensor (no recompilation when it
changes). ``c == 0`` returns the base output itself, read from a Python mirror (no device sync).

Gradient checkpointing: the hooks must still be attached when backward recomputes the forward,
so run ``loss.backward()`` inside the ``with`` block. Leaving the block with a checkpointed
model that ran a grad-enabled forward logs a warning.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ._types import Coeff, FactorA, FactorB
from .coefficient import Coefficient, validate_coeff
from .layout import Target, TargetLayout


class AdapterStateError(RuntimeError):
    """An adapter was used in a state that does not allow it (re-entry, detach when detached)."""


def _name_model(model: nn.Module) -> str:
    return f"{type(model).__name__} at {id(model):#x}"


def check_state_dict(
    state: Mapping[str, Tensor], current: Mapping[str, Tensor], required: set[str] | None = None
) -> None:
    """Strict checks before an adapter copies ``state`` in: keys, shapes, finite values.

    Args:
        state: the incoming tensors.
        current: the adapter's tensors, same keys.
        required: keys that must be present (default: all of ``current``).

    Raises:
        KeyError: missing or unexpected keys (all listed).
        ValueError: a shape mismatch or non-finite values (the key is named).
    """
    required = set(current) if required is None else required
    missing, unexpected = sorted(required - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not match {tuple(current[key].shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key}: holds non-finite values")


def _is_checkpointing(model: nn.Module) -> bool:
    """transformers' activation (gradient) checkpointing flag, under its old or new name."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class LowRankAdapter:
    """Base class: an adapter whose delta on each target is ``B(c) @ A``.

    Subclasses implement :meth:`hook_factors` (differentiable factors and a static scale) and
    may override :meth:`dropout`.

    Attributes:
        layout: the :class:`~modlora.layout.TargetLayout` the adapter was built on.
        enabled: an on/off switch read by every hook call (``False`` → base output).
        gate: optional callable; when set, the hooks add the delta only while it returns True.
    """

    kind: ClassVar[str] = "lowrank"

    def __init__(self, model: nn.Module, layout: TargetLayout) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"an adapter needs an nn.Module, got {type(model).__name__}")
        self._model = model
        self.layout = layout
        self._coeff = Coefficient(1.0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._folds: list[_Folded] = []  # per-target fold caches of the current attachment
        self._grad_forward_seen = False
        self.training = False
        self.enabled = True
        self.gate: Callable[[], bool] | None = None
        self.deployed_c: float | None = None  # the calibrated c stored with a checkpoint
        self.extra_meta: dict = {}  # the user's metadata stored with a checkpoint
        # called with the adapter at the start of attach(); a guard raises to refuse (checkpoint.py
        # uses one to stop two copies of one checkpoint being attached to a model at once)
        self.attach_guards: list[Callable[[LowRankAdapter], None]] = []

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, extra_meta: dict | None = None, c: float | int | None = None) -> None:
        """Write the adapter to one ``.safetensors`` file (see :mod:`modlora.checkpoint`).

        Args:
            path: destination file (written atomically).
            extra_meta: JSON-serialisable user metadata.
            c: the calibrated / deployed coefficient to record.
        """
        from .checkpoint import save_adapter

        save_adapter(self, path, extra_meta=extra_meta, c=c)

    @classmethod
    def from_checkpoint(cls, model: nn.Module, path, **kwargs) -> "LowRankAdapter":
        """Rebuild an adapter of this kind from a file written by :meth:`save` (in eval mode)."""
        from .checkpoint import load_adapter

        adapter = load_adapter(model, path, expect=cls, **kwargs)
        if not isinstance(adapter, cls):
            raise TypeError(f"{path} holds a {type(adapter).__name__}, not a {cls.__name__}")
        return adapter

    # ------------------------------------------------------------------ subclass contract
    def hook_factors(self, target: Target) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scale)`` for ``target`` with ``ΔW(c) = c · scale · B @ A``; differentiable."""
        raise NotImplementedError

    def dropout(self, x: Tensor) -> Tensor:
        """Applied to the adapter's input in training mode; identity by default."""
        return x

    # ------------------------------------------------------------------ factors
    @torch.no_grad()
    def delta_factors(self, c: float | int = 1.0) -> dict[str, tuple[FactorA, FactorB]]:
        """The delta at coefficient ``c`` as factors, ``{target name: (A, B)}``, ``ΔW = B @ A``.

        ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)`` with ``c`` and the scale folded in, both
        float32, detached, on the target's device, in the logical ``(d_out, d_in)`` orientation
        (also for GPT-2 ``Conv1D``, whose weight is stored transposed).
        """
        value = validate_coeff(c)
        if not isinstance(value, float):
            raise ValueError("delta_factors needs a scalar c (a merged weight has one delta)")
        out = {}
        for target in self.layout:
            a, b, scale = self.hook_factors(target)
            out[target.name] = (a.float().clone(), b.float() * (value * scale))
        return out

    # ------------------------------------------------------------------ coefficient
    @property
    def c(self) -> float | Tensor:
        """The current coefficient (a float, or a ``(batch,)`` tensor)."""
        return self._coeff.value

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
        self._coeff.set(c)

    # ------------------------------------------------------------------ train / eval
    def train(self, mode: bool = True) -> "LowRankAdapter":
        """Training mode turns dropout on; returns ``self``."""
        self.training = bool(mode)
        return self

    def eval(self) -> "LowRankAdapter":
        return self.train(False)

    # ------------------------------------------------------------------ lifetime
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def model(self) -> nn.Module:
        """The model the adapter was built on."""
        return self._model

    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model`` is the one this adapter was built on."""
        if model is not self._model:
            raise ValueError(
                f"{type(self).__name__} was built on {_name_model(self._model)}, "
                f"not on the {_name_model(model)} passed here"
            )

    def attach(self, model: nn.Module, c: Coeff = 1.0) -> "LowRankAdapter":
        """Register the hooks (persistent form); ``detach()`` removes them.

        Raises:
            AdapterStateError: already attached, or one of ``attach_guards`` refused.
            ValueError: ``model`` is not the one the adapter was built on, or ``c`` is invalid.
        """
        self.check_model(model)
        if self.attached:
            raise AdapterStateError(
                f"{type(self).__name__} is already attached to {_name_model(model)}; "
                "detach() it (or leave its with-block) before attaching again"
            )
        for guard in self.attach_guards:
            guard(self)
        self._coeff.set(c)
        for target in self.layout:
            self._coeff.on(target.device)  # create every device's tensor now, not while tracing
        self._folds = []
        handles = []
        try:
            for target in self.layout:
                handles.append(target.module.register_forward_hook(self._make_hook(target)))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles = handles
        self._grad_forward_seen = False
        return self

    def detach(self) -> None:
        """Remove the hooks.

        Raises:
            AdapterStateError: not attached.
        """
        if not self.attached:
            raise AdapterStateError(f"{type(self).__name__} is not attached")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for folded in self._folds:
            folded.clear()
        self._folds = []
        if self._grad_forward_seen and _is_checkpointing(self._model):
            logger.warning(
                "{} detached from a gradient-checkpointed model after a grad-enabled forward: "
                "run backward inside the with-block, or the recomputed forward has no adapter",
                type(self).__name__,
            )

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

    # ------------------------------------------------------------------ the hook
    def _active(self) -> bool:
        return self.enabled and (self.gate is None or bool(self.gate()))

    def _make_hook(self, target: Target):
        """The forward hook of one target; everything that can be looked up once is bound here."""
        coeff = self._coeff
        device = target.device
        module = target.module
        folded = _Folded()
        self._folds.append(folded)
        is_compiling, grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled

        def hook(mod: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not self.enabled or (self.gate is not None and not self.gate()):
                return output
            if is_compiling():  # pure tensor math: c is a graph input, no caches
                return output + self._delta(target, args[0], coeff.on(device), output.dtype)
            if coeff.is_zero:  # Python mirror: no device sync, the base output bit for bit
                return output
            if grad_enabled():
                self._grad_forward_seen = True
                return self._forward_grad(target, args[0], output, coeff, device, folded)
            inplace = _owns_output(module, hook)
            return self._forward_no_grad(target, args[0], output, coeff, device, folded, inplace)

        hook._modlora = True  # marks the hook for _owns_output
        return hook

    def _adapter_input(self, x: Tensor, a: Tensor) -> Tensor:
        """``x`` in the adapter's dtype, with dropout in training mode."""
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        return self.dropout(x) if self.training else x

    def _per_sample(self, target: Target, x: Tensor, c: Tensor) -> None:
        if x.dim() < 2 or x.shape[0] != c.shape[0]:
            raise ValueError(
                f"per-sample coefficient has {c.shape[0]} values but the input of "
                f"{target.name!r} has shape {tuple(x.shape)} (batch must be the first axis)"
            )

    def _forward_no_grad(
        self,
        target: Target,
        x: Tensor,
        output: Tensor,
        coeff: Coefficient,
        device: torch.device,
        folded: "_Folded",
        inplace: bool,
    ) -> Tensor:
        """Inference: ``c · scale`` folded into a cached ``B``; the add fused into one ``addmm_``.

        Two kernels per call at scalar ``c``: ``h = x @ A.T`` and ``out += h @ B(c).T``, the
        latter written into the layer's own output when nothing else can have seen it.
        """
        a, b, scale = self.hook_factors(target)
        scalar = coeff.scalar
        if scalar is None:
            c = coeff.on(device)
            self._per_sample(target, x, c)
        x2 = self._adapter_input(x.reshape(-1, x.shape[-1]), a)  # (tokens, d_in)
        h = torch.mm(x2, a.T)  # (tokens, r)
        if scalar is None:
            s = c * scale  # (batch,)
            h.view(c.shape[0], -1, h.shape[-1]).mul_(s.view(-1, 1, 1))  # (batch, seq, r)
            bt = b.T if b.dtype == h.dtype else b.to(h.dtype).T
        else:
            bt = folded.get_t(b, scalar * scale)  # (r, d_out)
        if output.dtype == h.dtype and output.is_contiguous():
            out2 = output.view(-1, output.shape[-1])  # (tokens, d_out)
            if inplace and (not output.is_inference() or torch.is_inference_mode_enabled()):
                out2.addmm_(h, bt)
                return output
            return torch.addmm(out2, h, bt).view(output.shape)
        delta = torch.mm(h, bt).to(output.dtype)  # (tokens, d_out)
        return output + delta.view(output.shape)

    def _forward_grad(
        self,
        target: Target,
        x: Tensor,
        output: Tensor,
        coeff: Coefficient,
        device: torch.device,
        folded: "_Folded",
    ) -> Tensor:
        """Training: differentiable through ``A`` and ``B``; never saves the coefficient tensor.

        Scalar ``c`` enters as a Python number (a constant of the graph), a per-sample ``c`` as a
        fresh product ``c · scale``; so ``set_coeff`` between a ``+c`` and a ``−c`` forward
        followed by one backward gives each forward its own coefficient.
        """
        a, b, scale = self.hook_factors(target)
        scalar = coeff.scalar
        x = self._adapter_input(x, a)
        h = F.linear(x, a)  # (*lead, r)
        if scalar is None:
            c = coeff.on(device)
            self._per_sample(target, x, c)
            s = c * scale  # a fresh tensor: autograd never saves the coefficient itself
            h = h * s.view(-1, *([1] * (h.dim() - 1)))  # (batch, ..., r)
            bs = b
        elif a.requires_grad or b.requires_grad:
            factor = scalar * scale
            bs = b if factor == 1.0 else b * factor  # (d_out, r), differentiable
        else:
            bs = folded.get(b, scalar * scale)  # frozen factors (a history): the cached fold
        if bs.dtype != h.dtype:
            bs = bs.to(h.dtype)
        if output.dtype == h.dtype and output.is_contiguous():
            out2 = output.view(-1, output.shape[-1])  # (tokens, d_out)
            h2 = h.reshape(-1, h.shape[-1])  # (tokens, r)
            return torch.addmm(out2, h2, bs.T).view(output.shape)
        return output + F.linear(h, bs).to(output.dtype)

    def _delta(
        self,
        target: Target,
        x: Tensor,
        c: Tensor,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """``c · scale · (x @ A.T) @ B.T``, shape ``(*lead, d_out)``: the reference math.

        Used while ``torch.compile`` traces the hooks (``c`` read from its tensor, so changing it
        does not recompile) and by :mod:`modlora.merge` to check a merge.
        """
        a, b, scale = self.hook_factors(target)
        if c.dim() == 1:
            self._per_sample(target, x, c)
        x = self._adapter_input(x, a)
        h = F.linear(x, a)  # (*lead, r)
        s = c * scale  # a fresh tensor: autograd never saves the coefficient itself
        if s.dim() == 1:
            s = s.view(-1, *([1] * (h.dim() - 1)))  # (batch, 1, ..., 1)
        delta = F.linear(h * s, b)  # (*lead, d_out)
        return delta if delta.dtype == out_dtype else delta.to(out_dtype)


class _Folded:
    """``B · factor`` for one target, recomputed only when ``B`` (identity or version) or the
    factor changes. The cached tensor is replaced, never modified in place, so a graph that saved
    an earlier one keeps it intact."""

    __slots__ = ("factor", "source", "value", "value_t", "version")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.source: Tensor | None = None
        self.value: Tensor | None = None  # (d_out, r)
        self.value_t: Tensor | None = None  # (r, d_out) view of value
        self.version = -1
        self.factor = 0.0

    def get(self, b: Tensor, factor: float) -> Tensor:
        """``b · factor``, shape ``(d_out, r)``."""
        if factor == 1.0:
            return b
        if b.is_inference():  # no version counter: cannot tell an in-place change, recompute
            with torch.no_grad():
                return b * factor
        self._refresh(b, factor)
        return self.value

    def get_t(self, b: Tensor, factor: float) -> Tensor:
        """``(b · factor).T``, shape ``(r, d_out)`` (a view; the hot path's right operand)."""
        if factor == 1.0:
            return b.T
        if b.is_inference():
            with torch.no_grad():
                return (b * factor).T
        self._refresh(b, factor)
        return self.value_t

    def _refresh(self, b: Tensor, factor: float) -> None:
        version = b._version
        if self.source is not b or self.version != version or self.factor != factor:
            with torch.no_grad():
                self.value = b * factor  # (d_out, r)
            self.value_t = self.value.T  # (r, d_out)
            self.source, self.version, self.factor = b, version, factor


def _owns_output(module: nn.Module, hook: Callable) -> bool:
    """True when no code but modlora hooks can have seen ``module``'s output before ``hook``.

    Then ``hook`` may add its delta in place; otherwise a hook registered earlier (or a global
    forward hook) might hold the base output, and it must not change under it.
    """
    if _module_globals._global_forward_hooks:
        return False
    for other in module._forward_hooks.values():
        if other is hook:
            return True
        if not getattr(other, "_modlora", False):
            return False
    return False
