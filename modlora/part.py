"""One adapter's tensors on one target layer: a small ``nn.Module`` per target.

Trainable tensors are ``nn.Parameter``s, frozen ones buffers, so torch's own ``.to()``,
``state_dict``, ``parameters``, ``train/eval``, ``deepcopy``, DDP and FSDP2 handle them. A kind
subclasses :class:`TargetPart` and says, in :meth:`~TargetPart.factors`, how its tensors make
the delta ``ΔW(c) = c · scale · B @ A``, by calling the kind's pure factor function.

A part lives in its adapter's ``parts`` tree (under the target's own name) and, while the
adapter is attached, also in the target layer itself (``layer.<slot>``), where the forward
hook finds it.
"""

import torch
from torch import Tensor, nn

from .sharding import any_sharded, full_tensor, shard_like


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
        self.routed = False  # set from the target by the adapter: see modlora.samples
        self.transposed = False  # a fused expert weight stored (E, d_in, d_out)

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
        if self.pending_init and not self.on_meta:
            raise AdapterStateError(
                f"the {type(self.adapter).__name__} part of {self.name!r} was built on the "
                "meta device and never initialised: call adapter.reset_parameters() (or "
                "load_state_dict) after materialising it"
            )
        return self.factors()

    def full_factors(self) -> tuple[Tensor, Tensor, float]:
        """:meth:`checked_factors` of the whole tensors, also when FSDP2 has sharded them.

        Outside a forward, FSDP2 keeps each parameter as a ``DTensor`` shard; they are gathered
        here (a collective: under FSDP2 every rank must call it) and fed to the kind's pure
        factor function, the one :meth:`factors` uses too.
        """
        tensors = self.tensors()
        if not any_sharded(tensors.values()):
            return self.checked_factors()
        adapter = self.adapter
        full = {role: full_tensor(t) for role, t in tensors.items()}
        return type(adapter).target_factors(adapter.config(), self.name, full)

    @property
    def on_meta(self) -> bool:
        """The tensors are on the meta device (hold no values)."""
        return any(t.device.type == "meta" for t in self.tensors().values())

    @property
    def rank(self) -> int:
        down = self.tensors()[self.adapter.factor_roles[0]]  # (r, d_in); a shard: global shape
        return int(down.shape[-2])

    def tensors(self) -> dict[str, Tensor]:
        """``{role: tensor}``: parameters and buffers under their role names."""
        return {**self._parameters, **self._buffers}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + role in state_dict for role in self.tensors()):
            self.pending_init = False  # every tensor of the part was given a value

    def extra_repr(self) -> str:
        if any_sharded(self.tensors().values()):
            return "sharded (FSDP2)"
        a, b, scale = self.factors()
        return f"r={a.shape[-2]}, d_in={a.shape[-1]}, d_out={b.shape[-2]}, scale={scale:g}"


class Parts(nn.Module):
    """One adapter's parts, in a tree of plain modules that mirrors the model's module names, so
    ``state_dict`` keys read ``<target name>.<role>`` below it. Loading a state dict checks every
    given tensor (shape, finite values) before torch copies anything."""

    def __init__(self) -> None:
        super().__init__()
        self._by_name: dict[str, TargetPart] = {}
        self.register_load_state_dict_pre_hook(_check_incoming_state)

    def add(self, part: TargetPart) -> None:
        """Put ``part`` in the tree under its target's name."""
        node: nn.Module = self
        *path, leaf = part.name.split(".")
        for step in path:
            child = node._modules.get(step)
            if child is None:
                child = node._modules[step] = nn.Module()
            node = child
        node._modules[leaf] = part
        self._by_name[part.name] = part

    def __getitem__(self, name: str) -> TargetPart:
        return self._by_name[name]

    def items(self):
        """``(target name, part)`` in the order they were added (model order)."""
        return self._by_name.items()

    def dtype(self, default: torch.dtype) -> torch.dtype:
        """The one floating dtype of the parts' tensors; ``default`` when there are no parts yet
        or they mix dtypes (a save refuses those)."""
        dtypes = {
            t.dtype
            for _, part in self.items()
            for t in part.tensors().values()
            if t.is_floating_point()
        }
        return dtypes.pop() if len(dtypes) == 1 else default

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        """``{target: {role: tensor}}`` (the live tensors, not copies)."""
        return {name: part.tensors() for name, part in self.items()}

    @torch.no_grad()
    def load(self, tensors) -> None:
        """Copy ``{target: {role: tensor}}`` into the parts, in place (all targets, all roles).

        Raises:
            KeyError: a target or role missing or unexpected; ValueError: a shape mismatch or
                non-finite values. Checked before anything is copied.

        Whole tensors are cut into the shards of FSDP2-sharded parameters (every rank must load).
        """
        current = self.tensors()
        wrong = sorted(set(current) ^ set(tensors))
        if wrong:
            raise KeyError(f"targets do not match the adapter's: {wrong[:8]}")
        for name, parts in current.items():
            if set(parts) != set(tensors[name]):
                raise KeyError(f"{name}: roles {sorted(tensors[name])}, expected {sorted(parts)}")
            for role, t in parts.items():
                _check_value(f"{name}.{role}", tensors[name][role], t)
        for name, part in self.items():
            for role, t in part.tensors().items():
                t.copy_(shard_like(tensors[name][role], t))
            part.pending_init = False


def _check_value(key: str, value: Tensor, current: Tensor) -> None:
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(
            f"{key}: shape {tuple(value.shape)} does not match the adapter's "
            f"{tuple(current.shape)}; nothing was loaded"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{key}: holds non-finite values; nothing was loaded")


def _check_incoming_state(module, state_dict, prefix, local_metadata, strict, *_) -> None:
    """Before torch's own ``load_state_dict`` copies anything into the parts: every tensor that
    is given must have the right shape and finite values (a bad state leaves them as they were)."""
    for key, current in module.state_dict(prefix=prefix, keep_vars=True).items():
        value = state_dict.get(key)
        if value is not None:  # torch reports missing keys itself (strict=True)
            _check_value(key, value, current)


def freeze_base(model: nn.Module) -> None:
    """Freeze the model's own parameters — not those of adapters attached to it (their parts
    are in the model's tree while attached, and building another adapter must not freeze them)."""
    owned = {id(p) for m in model.modules() if isinstance(m, TargetPart) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
