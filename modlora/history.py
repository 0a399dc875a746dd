"""``HistoryBake``: the frozen sum of kept rounds, ``Σ_k ΔW_k(c_k)``, in one hook per target.

Each round's factors at its own ``c_k`` are concatenated along the rank axis, so
``B_cat @ A_cat = Σ_k B_k(c_k) @ A_k`` exactly (no √w mixing of A and B). Rounds may be of any
kind and rank; a target touched by only some rounds gets only their factors.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import checks
from .adapter import LowRankAdapter
from .coefficient import validate_coeff
from .digest import adapter_digest, adapter_probe
from .fit import factor_problems, layout_of
from .kinds import register_kind
from .part import TargetPart


def history_factors(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, float]:
    """A history's delta: the concatenated ``A (Σr, d_in)`` and ``B (d_out, Σr)``, scale 1."""
    return a, b, 1.0


class HistoryPart(TargetPart):
    """The concatenated, frozen factors of one target (buffers ``A`` and ``B``, float32)."""

    def __init__(self, name: str, a: Tensor, b: Tensor) -> None:
        super().__init__(name)
        self.register_buffer("A", a.contiguous())
        self.register_buffer("B", b.contiguous())

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return history_factors(self.A, self.B)


@register_kind
class HistoryBake(LowRankAdapter):
    """Frozen sum of adapters at fixed coefficients, attached on construction.

    Args:
        model: the model every round was built on.
        rounds: ``[(adapter, c_k), ...]``; adapters of any kind (a ``HistoryBake`` too).
        gate: optional callable; the history applies only while it returns True.
        attach: attach the hooks now (``remove()`` takes them off).
        factors: instead of ``rounds``, concatenated factors ``{target: (A (Σr, d_in),
            B (d_out, Σr))}`` with each round's ``c_k`` folded into ``B`` (a checkpoint's).
        round_info: with ``factors``: what each round was (kind, c, ranks).

    Example:
        >>> hist = HistoryBake(model, [(round1, 1.0), (round2, 0.5)])
        >>> hist.enabled = False   # switch off without removing
        >>> hist.remove()          # base model, bit for bit
    """

    kind = "history"
    roles = ("A", "B")
    factor_roles = ("A", "B")
    config_keys = ("round_info",)
    selects_targets = False  # its targets are the rounds', not a stored selection
    attach_on_load = True  # like the constructor

    def __init__(
        self,
        model: nn.Module,
        rounds: Sequence[tuple[LowRankAdapter, float | int]] | None = None,
        gate: Callable[[], bool] | None = None,
        attach: bool = True,
        *,
        factors: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        round_info: list[dict] | None = None,
    ) -> None:
        if (rounds is None) == (factors is None):
            raise ValueError("HistoryBake needs either rounds=[(adapter, c), ...] or factors=")
        sources: list[LowRankAdapter] = []
        if rounds is not None:
            sources, factors, round_info = _concatenate(model, rounds)
        _check_factors(model, factors)
        super().__init__(model, layout_of(model, list(factors)))
        for target in self.layout:
            a, b = factors[target.name]
            a = a.to(target.device, torch.float32)
            b = b.to(target.device, torch.float32)
            self.add_part(HistoryPart(target.name, a, b))
        self.round_info = list(round_info or [])
        self.dtype = torch.float32
        self.gate = gate
        # A round whose delta is already in the model (merged, or an attached twin of a loaded
        # checkpoint) would be applied twice through the history: its own guards decide.
        self.attach_guards.append(RoundGuards(sources))
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
        """``HistoryBake(model, factors=factors, ...)``: from concatenated factors."""
        return cls(model, gate=gate, attach=attach, factors=factors, round_info=round_info)

    def contained_deltas(self) -> list[dict]:
        """Its rounds (``round_info`` entries that carry a digest)."""
        return [info for info in self.round_info if isinstance(info.get("digest"), str)]

    def remove(self) -> None:
        """Detach the history's hooks: the model is the base again, bit for bit."""
        self.detach()

    # ------------------------------------------------------------------ kind protocol
    def config(self) -> dict:
        return {"round_info": self.round_info}

    @classmethod
    def parse_config(cls, meta: dict) -> dict:
        info = meta.get("round_info")
        if not isinstance(info, list) or not all(isinstance(x, dict) for x in info):
            raise checks.invalid(
                ValueError, "round_info", f"round_info must be a list of objects, got {info!r}"
            )
        return {"round_info": info, "dtype": checks.float_dtype(meta.get("dtype"), "dtype")}

    @classmethod
    def target_factors(cls, config: dict, name: str, tensors: dict) -> tuple[Tensor, Tensor, float]:
        return history_factors(tensors["A"], tensors["B"])

    @classmethod
    def check_target(cls, config: dict, name: str, tensors: dict, rank: int) -> None:
        total = 0
        for info in config["round_info"]:
            r = (info.get("ranks") or {}).get(name, 0)
            if not isinstance(r, int) or isinstance(r, bool):
                return  # ranks not recorded as ints: nothing to check against
            total += r
        if total and total != rank:
            raise ValueError(
                f"target {name!r}: A {tuple(tensors['A'].shape)}, B {tuple(tensors['B'].shape)}:"
                f" r={rank} but round_info ranks sum to {total}"
            )

    @classmethod
    def rebuild(cls, model, layout, config, tensors) -> "HistoryBake":
        factors = {n: (t["A"], t["B"]) for n, t in tensors.items()}
        history = cls(model, attach=False, factors=factors, round_info=config["round_info"])
        return history.to(config["dtype"])  # the file's dtype (a history cast before saving)


class RoundGuards:
    """A history's attach guard: each round's own guards (a module-level callable, not a lambda,
    so a history, and a model holding one, pickle with ``torch.save``)."""

    def __init__(self, rounds: list[LowRankAdapter]) -> None:
        self.rounds = rounds

    def __deepcopy__(self, memo: dict) -> "RoundGuards":
        return self  # the rounds are other adapters: a copied history checks the same ones

    def __call__(self, _history) -> None:
        for adapter in self.rounds:
            for guard in adapter.attach_guards:
                guard(adapter)


def _concatenate(model: nn.Module, rounds) -> tuple[list, dict, list]:
    """``(adapters, {target: (A_cat, B_cat)}, round_info)`` of ``[(adapter, c), ...]``."""
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
    for adapter, c in rounds:
        for name, (a, b) in adapter.delta_factors(float(c)).items():
            pieces.setdefault(name, []).append((a, b))
    factors = {
        name: (
            torch.cat([a for a, _ in parts], dim=-2),  # ([E,] Σr, d_in)
            torch.cat([b for _, b in parts], dim=-1),  # ([E,] d_out, Σr)
        )
        for name, parts in pieces.items()
    }
    info = [
        {
            "kind": a.kind,
            "c": float(c),
            "ranks": a.ranks(),
            "digest": adapter_digest(a),
            "probe": adapter_probe(a),
        }
        for a, c in rounds
    ]
    return [a for a, _ in rounds], factors, info


def _check_factors(model: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    problems = factor_problems(model, factors)
    if problems or not factors:
        raise ValueError(f"history factors do not fit this model: {problems or 'none given'}")


PiSSAHistoryBake = HistoryBake
"""Compatible name from the seed code: a history of PiSSA rounds is a ``HistoryBake``."""
