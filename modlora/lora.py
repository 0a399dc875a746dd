"""``ModulatedLoRA``: ``ΔW(c) = c · (alpha / r) · B @ A`` on every target."""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from . import checks
from ._types import Count, Number
from .adapter import LowRankAdapter
from .blocks import DEFAULT_EXCLUDE, LayerRange
from .kinds import register_kind
from .layout import TargetLayout, selected
from .part import TargetPart, freeze_base

Init = Literal["zero", "signed"]
INITS = ("zero", "signed")
SIGNED_INIT_STD = 1e-3
"""Standard deviation of ``B`` under ``init="signed"``: small enough to start near the base."""


def lora_factors(lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor, float]:
    """LoRA's delta: ``A = lora_A``, ``B = lora_B``, with ``scale = alpha / r``."""
    return lora_a, lora_b, scale


class LoRAPart(TargetPart):
    """``lora_A (r, d_in)`` and ``lora_B (d_out, r)`` of one target — ``(E, r, d_in)`` and
    ``(E, d_out, r)`` for fused experts — and its ``alpha / r``."""

    def __init__(self, target, r, alpha, dropout, dtype) -> None:
        device = target.device
        super().__init__(target.name, dropout, pending_init=device.type == "meta")
        self.scale = float(alpha) / r
        lead = () if target.experts is None else (target.experts,)
        self.lora_A = nn.Parameter(torch.empty(*lead, r, target.d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(*lead, target.d_out, r, dtype=dtype, device=device))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        params = self._parameters  # read live (FSDP2 swaps them in); faster than attributes
        return lora_factors(params["lora_A"], params["lora_B"], self.scale)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        rows = self.lora_A.view(-1, self.lora_A.shape[-1])  # (E·r, d_in): fan_in = d_in
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))  # PEFT's LoRA init for A
        self.lora_B.zero_()
        if init == "signed":
            self.lora_B.normal_(0.0, SIGNED_INIT_STD)
        self.pending_init = self.lora_A.device.type == "meta"  # no values to give on meta


def per_target_names(pattern: Mapping, names: Sequence[str], what: str) -> dict:
    r"""``{target name: value}`` from a ``rank_pattern`` / ``alpha_pattern`` whose keys are
    target names or, as in PEFT, regexes matching the end of a name (``"v_proj"``,
    ``r"mlp\.(up|down)_proj"``). A key that is a target's name is that target's alone (so a
    stored, resolved pattern rebuilds the same ranks); a target named by no key takes the first
    other key that matches it.

    Raises:
        ValueError: a key that matches no target (listed).
    """
    exact = set(pattern) & set(names)
    regexes = [k for k in pattern if k not in exact]
    out, used = {}, set()
    for name in names:
        key = name if name in exact else next((k for k in regexes if _ends(k, name, what)), None)
        if key is not None:
            out[name] = pattern[key]
            used.add(key)
    unknown = sorted(set(pattern) - used)
    if unknown:
        raise ValueError(f"{what} names layers that are not targets: {unknown}")
    return out


def _ends(key: str, name: str, what: str) -> bool:
    """PEFT's rule for a pattern key: ``key`` matches the end of ``name`` (whole name parts)."""
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error as err:
        raise ValueError(
            f"{what} key {key!r} is neither a target name nor a regex: {err}"
        ) from None


@register_kind
class ModulatedLoRA(LowRankAdapter):
    """A LoRA adapter scaled at run time by a signed coefficient ``c``.

    Args:
        model: the model to adapt. Its parameters are frozen (``requires_grad=False``).
        r: rank.
        alpha: scale numerator; the delta is ``c · (alpha / r) · B @ A``.
        targets: ``"all-linear"`` and/or regexes (see :func:`~modlora.find_targets`), or a
            :class:`~modlora.TargetLayout` already made (``exclude``/``layer_range`` then unused).
        exclude: regexes of layers to skip.
        layer_range: depth band, e.g. ``(0.2, 0.8)``.
        dropout: dropout probability on the adapter's input, active in training mode.
        init: ``"zero"`` (``B = 0``: an exact no-op at any ``c``) or ``"signed"`` (small normal
            ``B``, breaks the ±c symmetry at the start of training).
        dtype: dtype of ``A`` and ``B`` (float32 by default: bf16 Adam steps round to zero).
        rank_pattern: per-target ranks ``{target name: r}`` overriding ``r``; a key may also be
            a regex matching the end of target names, as in PEFT (``{"v_proj": 8}``).
        alpha_pattern: per-target alphas ``{target name: alpha}`` overriding ``alpha`` (keys
            as in ``rank_pattern``).

    On a model on the ``meta`` device the factors are made on ``meta`` too; after
    ``model.to_empty(...)`` call ``lora.to_empty(device=...)`` (if detached) and
    ``lora.reset_parameters()``, or load a state dict.

    Example:
        >>> lora = ModulatedLoRA(model, r=16, alpha=32)
        >>> with lora(model, c=-1.5):
        ...     y = model(x)
    """

    kind = "lora"
    roles = ("lora_A", "lora_B")
    factor_roles = ("lora_A", "lora_B")
    config_keys = ("r", "alpha", "dropout", "init", "rank_pattern", "alpha_pattern")

    def __init__(
        self,
        model: nn.Module,
        r: Count = 16,
        alpha: Number = 32.0,
        targets: Sequence[str] | str | TargetLayout = ("all-linear",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        layer_range: LayerRange | None = None,
        dropout: float | int = 0.0,
        init: Init = "zero",
        dtype: torch.dtype = torch.float32,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float | int] | None = None,
    ) -> None:
        config = self._checked(r, alpha, dropout, init, dtype, rank_pattern, alpha_pattern)
        layout = selected(model, targets, exclude, layer_range)
        for what in ("rank_pattern", "alpha_pattern"):
            config[what] = per_target_names(config[what], layout.names, what)
        super().__init__(model, layout)
        self.r, self.alpha, self.dropout_p = config["r"], config["alpha"], config["dropout"]
        self.init, self.dtype = config["init"], config["dtype"]
        self.rank_pattern, self.alpha_pattern = config["rank_pattern"], config["alpha_pattern"]
        for t in layout:
            rank = self.rank_pattern.get(t.name, self.r)
            alpha = self.alpha_pattern.get(t.name, self.alpha)
            self.add_part(LoRAPart(t, rank, alpha, self.dropout_p, self.dtype))
        self.reset_parameters()
        freeze_base(model)

    @staticmethod
    def _checked(r, alpha, dropout, init, dtype, rank_pattern, alpha_pattern) -> dict:
        return {
            "r": checks.positive_int(r, "r"),
            "alpha": checks.positive_number(alpha, "alpha"),
            "dropout": checks.probability(dropout, "dropout"),
            "init": checks.one_of(init, INITS, "init"),
            "dtype": checks.float_dtype(dtype, "dtype"),
            "rank_pattern": checks.per_target(rank_pattern, "rank_pattern", checks.positive_int),
            "alpha_pattern": checks.per_target(
                alpha_pattern, "alpha_pattern", checks.positive_number
            ),
        }

    def reset_parameters(self) -> None:
        """``A`` Kaiming-uniform (PEFT's init), ``B`` zero (``init="signed"``: small normal)."""
        for _, part in self.named_parts():
            part.reset_parameters(self.init)

    # ------------------------------------------------------------------ kind protocol
    def config(self) -> dict:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout_p,
            "init": self.init,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
        }

    @classmethod
    def parse_config(cls, meta: dict) -> dict:
        return cls._checked(
            meta.get("r"),
            meta.get("alpha"),
            meta.get("dropout"),
            meta.get("init"),
            meta.get("dtype"),
            meta.get("rank_pattern"),
            meta.get("alpha_pattern"),
        )

    @classmethod
    def target_factors(cls, config: dict, name: str, tensors: dict) -> tuple[Tensor, Tensor, float]:
        a = tensors["lora_A"]
        alpha = config["alpha_pattern"].get(name, config["alpha"])
        return lora_factors(a, tensors["lora_B"], alpha / a.shape[-2])

    @classmethod
    def check_target(cls, config: dict, name: str, tensors: dict, rank: int) -> None:
        want = config["rank_pattern"].get(name, config["r"])
        if rank != want:
            raise ValueError(
                f"target {name!r}: lora_A {tuple(tensors['lora_A'].shape)}, lora_B "
                f"{tuple(tensors['lora_B'].shape)}: shapes give r={rank} but the metadata says "
                f"r={want}"
            )

    @classmethod
    def rebuild(cls, model, layout, config, tensors) -> "ModulatedLoRA":
        devices = sorted(
            {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
        )
        with torch.random.fork_rng(devices=devices):  # the throw-away init must not move the RNG
            self = cls(
                model,
                targets=layout,
                **config,
            )
        self.load_target_tensors(tensors)
        return self
