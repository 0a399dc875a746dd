"""``ModulatedLoRA``: ``ΔW(c) = c · (alpha / r) · B @ A`` on every target."""

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .hooks import LowRankAdapter, check_state_dict
from .layout import DEFAULT_EXCLUDE, LayerRange, Target, find_targets

Init = Literal["zero", "signed"]
SIGNED_INIT_STD = 1e-3
"""Standard deviation of ``B`` under ``init="signed"``: small enough to start near the base."""


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ModulatedLoRA(LowRankAdapter):
    """A LoRA adapter scaled at run time by a signed coefficient ``c``.

    Args:
        model: the model to adapt. Its parameters are frozen (``requires_grad=False``).
        r: rank.
        alpha: scale numerator; the delta is ``c · (alpha / r) · B @ A``.
        targets: ``"all-linear"`` and/or regexes (see :func:`~modlora.find_targets`).
        exclude: regexes of layers to skip.
        layer_range: depth band, e.g. ``(0.2, 0.8)``.
        dropout: dropout probability on the adapter's input, active in training mode.
        init: ``"zero"`` (``B = 0``: an exact no-op at any ``c``) or ``"signed"`` (small normal
            ``B``, breaks the ±c symmetry at the start of training).
        dtype: dtype of ``A`` and ``B`` (float32 by default: bf16 Adam steps round to zero).
        rank_pattern: per-target ranks ``{target name: r}`` overriding ``r``.
        alpha_pattern: per-target alphas ``{target name: alpha}`` overriding ``alpha``.

    Example:
        >>> lora = ModulatedLoRA(model, r=16, alpha=32)
        >>> with lora(model, c=-1.5):
        ...     y = model(x)
    """

    kind = "lora"

    def __init__(
        self,
        model: nn.Module,
        r: int = 16,
        alpha: float | int = 32.0,
        targets: Sequence[str] | str = ("all-linear",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        layer_range: LayerRange | None = None,
        dropout: float | int = 0.0,
        init: Init = "zero",
        dtype: torch.dtype = torch.float32,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float | int] | None = None,
    ) -> None:
        r = _check_positive_int(r, "r")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in ("zero", "signed"):
            raise ValueError(f"init must be 'zero' or 'signed', got {init!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        layout = find_targets(model, targets, exclude, layer_range)
        rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            unknown = sorted(set(pattern) - set(layout.names))
            if unknown:
                raise ValueError(f"{what} names layers that are not targets: {unknown}")
        for name, value in rank_pattern.items():
            _check_positive_int(value, f"rank_pattern[{name!r}]")
        for name, value in alpha_pattern.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"alpha_pattern[{name!r}] must be a positive finite number, got {value!r}"
                )
        super().__init__(model, layout)
        self.r, self.alpha, self.dropout_p = r, float(alpha), float(dropout)
        self.rank_pattern, self.alpha_pattern = (
            rank_pattern,
            {k: float(v) for k, v in alpha_pattern.items()},
        )
        self.init, self.dtype = init, dtype
        self._dropout = nn.Dropout(self.dropout_p)
        self._a: dict[str, nn.Parameter] = {}
        self._b: dict[str, nn.Parameter] = {}
        for target in layout:
            rank = rank_pattern.get(target.name, r)
            a = torch.empty(rank, target.d_in, dtype=dtype, device=target.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's LoRA init for A
            b = torch.zeros(target.d_out, rank, dtype=dtype, device=target.device)
            if init == "signed":
                b.normal_(0.0, SIGNED_INIT_STD)
            self._a[target.name] = nn.Parameter(a)
            self._b[target.name] = nn.Parameter(b)
        model.requires_grad_(False)

    # ------------------------------------------------------------------ factors
    def hook_factors(self, target: Target) -> tuple[Tensor, Tensor, float]:
        a = self._a[target.name]
        return a, self._b[target.name], self.alpha_pattern.get(target.name, self.alpha) / a.shape[0]

    def dropout(self, x: Tensor) -> Tensor:
        return self._dropout(x) if self.dropout_p > 0 else x

    def ranks(self) -> dict[str, int]:
        """``{target name: rank}``."""
        return {name: a.shape[0] for name, a in self._a.items()}

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<target>.lora_A", A)`` and ``("<target>.lora_B", B)`` for every target."""
        for name in self._a:
            yield f"{name}.lora_A", self._a[name]
            yield f"{name}.lora_B", self._b[name]

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self) -> dict[str, Tensor]:
        """Detached copies of every factor, keyed like :meth:`named_parameters`."""
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy factors in place (strict: same keys, same shapes, finite values).

        Raises:
            KeyError: missing or unexpected keys (all listed).
            ValueError: a shape mismatch or non-finite values (the target is named).
        """
        params = dict(self.named_parameters())
        check_state_dict(state, params)
        for key, value in state.items():
            params[key].copy_(value)
