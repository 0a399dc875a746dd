"""The kind protocol every adapter kind implements, and the registry: ``kind`` string → class.

A kind is a :class:`~modlora.adapter.LowRankAdapter` subclass that implements
:class:`AdapterKind` and registers with one line, ``@register_kind``, in its own file.
Checkpoints, the offline merge, PEFT export and training-state resume look kinds up here and
never branch on the kind string themselves.
"""

from typing import Any, ClassVar

from torch import Tensor

KINDS: dict[str, type] = {}


class AdapterKind:
    """The kind protocol (class attributes and methods a kind defines).

    Attributes:
        kind: the string stored in checkpoints.
        roles: its tensors per target, e.g. ``("lora_A", "lora_B")`` (file and state-dict order).
        factor_roles: ``(down, up)``, the two roles whose shapes give the rank
            (``down: (r, d_in)``, ``up: (d_out, r)``).
        config_keys: metadata keys its :meth:`parse_config` needs; ``optional_keys`` may be absent.
        selects_targets: its targets come from a stored selection (``targets`` / ``exclude`` /
            ``layer_range``), re-run on load; False: exactly the stored names (a history).
        base_check: what loading onto another base does by default: ``"raise"`` or ``"warn"``.
        attach_on_load: ``load_adapter`` attaches it (as its constructor does).
    """

    kind: ClassVar[str] = "lowrank"
    roles: ClassVar[tuple[str, ...]] = ()
    factor_roles: ClassVar[tuple[str, str]] = ("A", "B")
    config_keys: ClassVar[tuple[str, ...]] = ()
    optional_keys: ClassVar[tuple[str, ...]] = ()
    selects_targets: ClassVar[bool] = True
    base_check: ClassVar[str] = "warn"
    attach_on_load: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """The kind's own metadata (JSON values), as stored in a checkpoint."""
        raise NotImplementedError

    @classmethod
    def parse_config(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Check decoded metadata and return the kind's config (``dtype`` included).

        Raises ``ValueError`` / ``TypeError`` whose ``argument`` attribute names the key
        (:func:`modlora.checks.invalid`)."""
        raise NotImplementedError

    @classmethod
    def target_factors(
        cls, config: dict, name: str, tensors: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, float]:
        """The pure factor function: ``(A (r, d_in), B (d_out, r), scale)`` of target ``name``.

        The kind's parts compute their factors with the same function, so hooks, merge, offline
        merge, PEFT export and checkpoints share one formula; ``c`` is applied by the caller
        (``ΔW(c) = c · scale · B @ A``)."""
        raise NotImplementedError

    @classmethod
    def check_target(cls, config: dict, name: str, tensors: dict[str, Tensor], rank: int) -> None:
        """Raise ``ValueError`` naming ``name`` if its tensors contradict ``config`` (beyond the
        shapes, which are checked for every kind)."""

    def contained_deltas(self) -> list[dict]:
        """Other adapters' deltas this one holds, as ``{"kind", "ranks": {target: r}, "digest"}``
        (a history: its rounds); checked against what is in the model before it attaches."""
        return []

    @classmethod
    def base_problem(
        cls, config: dict, name: str, tensors: dict[str, Tensor], weight: Tensor
    ) -> str | None:
        """Why ``tensors`` cannot have been made on the dense base ``weight (d_out, d_in)``
        (``None``: no objection). Run on load and offline merge besides the fingerprints."""
        return None

    @classmethod
    def rebuild(cls, model, layout, config: dict, tensors: dict):
        """The adapter from ``config`` and ``{target: {role: tensor}}`` (validated already; no
        SVD, no random init that moves the caller's RNG)."""
        raise NotImplementedError


def register_kind(cls: type) -> type:
    """Class decorator: make ``cls`` loadable under ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'kind'")
    if KINDS.get(kind, cls) is not cls:
        raise ValueError(f"kind {kind!r} is already registered by {KINDS[kind].__name__}")
    KINDS[kind] = cls
    return cls


def kind_class(kind: str) -> type:
    """The class registered under ``kind``.

    Raises:
        ValueError: an unknown kind (the known ones are listed).
    """
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds {sorted(KINDS)}") from None
