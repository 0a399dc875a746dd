"""One adapter's tensors on one target layer: a small ``nn.Module`` per target.

Trainable tensors are ``nn.Parameter``s, frozen ones buffers, so torch's own ``.to()``,
``state_dict``, ``parameters``, ``train/eval``, ``deepcopy``, DDP and FSDP2 handle them. A kind
subclasses :class:`TargetPart` and says, in :meth:`~TargetPart.factors`, how its tensors make
the delta ``ΔW(c) = c · scale · B @ A``, by calling the kind's pure factor function.

A part lives in its adapter's ``parts`` tree (under the target's own name) and, while the
adapter is attached, also in the target layer itself (``layer.<slot>``), where the forward
hook finds it.
"""

from torch import Tensor, nn


class AdapterStateError(RuntimeError):
    """An adapter was used in a state that does not allow it (re-entry, detach when detached,
    tensors not yet materialised, a delta that would apply twice)."""


class TargetPart(nn.Module):
    """Base class of the per-target modules.

    Attributes:
        name: the target layer's qualified name in the model.
        dropout: dropout probability on the adapter's input, applied in training mode.
        pending_init: the tensors were made on the ``meta`` device and hold no values yet;
            the hook refuses to run until the adapter's ``reset_parameters()`` or a
            ``load_state_dict`` fills them.
    """

    def __init__(self, name: str, dropout: float = 0.0, pending_init: bool = False) -> None:
        super().__init__()
        self.name = name
        self.dropout = float(dropout)
        self.pending_init = pending_init

    @property
    def adapter(self):
        """The adapter this part belongs to (not a submodule: no cycle in the module tree)."""
        return self.__dict__["_adapter"]

    def bind(self, adapter) -> None:
        self.__dict__["_adapter"] = adapter

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A (r, d_in), B (d_out, r), scale)`` with ``ΔW(c) = c · scale · B @ A``;
        differentiable in the part's parameters."""
        raise NotImplementedError

    def checked_factors(self) -> tuple[Tensor, Tensor, float]:
        """:meth:`factors`, refusing tensors that were never given values."""
        if self.pending_init:
            a = self.factors()[0]
            if a.device.type != "meta":
                raise AdapterStateError(
                    f"the {type(self.adapter).__name__} part of {self.name!r} was built on the "
                    "meta device and never initialised: call adapter.reset_parameters() (or "
                    "load_state_dict) after materialising it"
                )
        return self.factors()

    @property
    def rank(self) -> int:
        return int(self.factors()[0].shape[-2])

    def tensors(self) -> dict[str, Tensor]:
        """``{role: tensor}``: parameters and buffers under their role names."""
        return {**self._parameters, **self._buffers}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + role in state_dict for role in self.tensors()):
            self.pending_init = False  # every tensor of the part was given a value

    def extra_repr(self) -> str:
        a, b, scale = self.factors()
        return f"r={a.shape[-2]}, d_in={a.shape[-1]}, d_out={b.shape[-2]}, scale={scale:g}"
