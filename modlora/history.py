"""``HistoryBake``: the frozen sum of kept rounds, ``Σ_k ΔW_k(c_k)``, in one hook per target.

Each round's factors at its own ``c_k`` are concatenated along the rank axis, so
``B_cat @ A_cat = Σ_k B_k(c_k) @ A_k`` exactly (no √w mixing of A and B). Rounds may be of any
kind and rank; a target touched by only some rounds gets only their factors.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .coefficient import validate_coeff
from .hooks import LowRankAdapter
from .layout import Target, TargetLayout, block_index, find_block_list, is_target_type, make_target


class HistoryBake(LowRankAdapter):
    """Frozen sum of adapters at fixed coefficients, attached on construction.

    Args:
        model: the model every round was built on.
        rounds: ``[(adapter, c_k), ...]``; adapters of any kind (a ``HistoryBake`` too).
        gate: optional callable; the history applies only while it returns True.
        attach: attach the hooks now (``remove()`` takes them off).

    Example:
        >>> hist = HistoryBake(model, [(round1, 1.0), (round2, 0.5)])
        >>> hist.enabled = False   # switch off without removing
        >>> hist.remove()          # base model, bit for bit
    """

    kind = "history"

    def __init__(
        self,
        model: nn.Module,
        rounds: Sequence[tuple[LowRankAdapter, float | int]],
        gate: Callable[[], bool] | None = None,
        attach: bool = True,
    ) -> None:
        rounds = list(rounds)
        if not rounds:
            raise ValueError("HistoryBake needs at least one (adapter, c) round")
        for i, entry in enumerate(rounds):
            if not (isinstance(entry, tuple | list) and len(entry) == 2):
                raise TypeError(f"round {i} must be an (adapter, c) pair, got {entry!r}")
            adapter, c = entry
            if not isinstance(adapter, LowRankAdapter):
                raise TypeError(f"round {i} is a {type(adapter).__name__}, not a modlora adapter")
            adapter.check_model(model)
            if not isinstance(validate_coeff(c), float):
                raise ValueError(f"round {i}: a history coefficient must be a scalar, got {c!r}")

        pieces: dict[str, list[tuple[Tensor, Tensor]]] = {}
        targets: dict[str, Target] = {}
        for adapter, c in rounds:
            for name, (a, b) in adapter.delta_factors(float(c)).items():
                pieces.setdefault(name, []).append((a, b))
                targets.setdefault(name, adapter.layout[name])
        order = [n for n, _ in model.named_modules() if n in targets]
        layout = TargetLayout(
            targets={n: targets[n] for n in order},
            blocks=rounds[0][0].layout.blocks,
            patterns=tuple(order),
            exclude=(),
            layer_range=None,
        )
        super().__init__(model, layout)
        self._a: dict[str, Tensor] = {}
        self._b: dict[str, Tensor] = {}
        for name, parts in pieces.items():
            self._a[name] = torch.cat([a for a, _ in parts], dim=0).contiguous()  # (Σr, d_in)
            self._b[name] = torch.cat([b for _, b in parts], dim=1).contiguous()  # (d_out, Σr)
        self.round_info = [
            {"kind": adapter.kind, "c": float(c), "ranks": _ranks(adapter)} for adapter, c in rounds
        ]
        self.gate = gate
        # A round whose delta is already in the model (merged, or an attached twin of a loaded
        # checkpoint) would be applied twice through the history: its own guards decide.
        sources = [adapter for adapter, _ in rounds]
        self.attach_guards.append(lambda _: [g(a) for a in sources for g in a.attach_guards])
        if attach:
            self.attach(model, 1.0)

    @classmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        round_info: list[dict] | None = None,
        gate: Callable[[], bool] | None = None,
        attach: bool = True,
    ) -> "HistoryBake":
        """Rebuild from concatenated factors ``{target: (A (Σr, d_in), B (d_out, Σr))}``.

        Raises:
            ValueError: a target that is not a linear layer of ``model``, or a shape mismatch.
        """
        modules = dict(model.named_modules())
        problems = []
        for name, (a, b) in factors.items():
            module = modules.get(name)
            if module is None or not is_target_type(module):
                problems.append(f"{name}: no such linear layer")
                continue
            t = make_target(name, module, None)
            if (
                a.dim() != 2
                or b.dim() != 2
                or a.shape != (a.shape[0], t.d_in)
                or b.shape != (t.d_out, a.shape[0])
            ):
                problems.append(
                    f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} vs layer (d_out={t.d_out}, d_in={t.d_in})"
                )
        if problems:
            raise ValueError(f"history factors do not fit this model: {problems}")
        blocks = find_block_list(model)
        order = [n for n in modules if n in factors]
        layout = TargetLayout(
            targets={n: make_target(n, modules[n], block_index(n, blocks)) for n in order},
            blocks=blocks,
            patterns=tuple(order),
            exclude=(),
            layer_range=None,
        )
        self = cls.__new__(cls)
        LowRankAdapter.__init__(self, model, layout)
        self._a, self._b = {}, {}
        for target in layout:
            a, b = factors[target.name]
            self._a[target.name] = a.to(target.device, torch.float32).contiguous()
            self._b[target.name] = b.to(target.device, torch.float32).contiguous()
        self.round_info = list(round_info or [])
        self.gate = gate
        if attach:
            self.attach(model, 1.0)
        return self

    def hook_factors(self, target: Target) -> tuple[Tensor, Tensor, float]:
        return self._a[target.name], self._b[target.name], 1.0

    def ranks(self) -> dict[str, int]:
        """``{target name: total rank}`` (sum over the rounds that touch it)."""
        return {name: a.shape[0] for name, a in self._a.items()}

    def parameters(self):
        """A history is frozen: no trainable parameters."""
        return iter(())

    def named_parameters(self):
        return iter(())

    def state_dict(self) -> dict[str, Tensor]:
        """Concatenated factors: ``<target>.A`` ``(Σr, d_in)`` and ``<target>.B`` ``(d_out, Σr)``."""
        out = {}
        for name in self._a:
            out[f"{name}.A"] = self._a[name].clone()
            out[f"{name}.B"] = self._b[name].clone()
        return out

    def remove(self) -> None:
        """Detach the history's hooks: the model is the base again, bit for bit."""
        self.detach()


def _ranks(adapter: LowRankAdapter) -> dict[str, int]:
    ranks = getattr(adapter, "ranks", None)
    return ranks() if callable(ranks) else {}


PiSSAHistoryBake = HistoryBake
"""Compatible name from the seed code: a history of PiSSA rounds is a ``HistoryBake``."""
