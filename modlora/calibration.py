"""Calibration statistics for activation-driven PiSSA selection, in memory flat in the token count.

For every target (and split: ``"all"``, or ``"chosen"`` / ``"rejected"``) the inputs ``X`` seen at
that layer are summarised by

* ``count``, the row sum and the Gram matrix ``Σ x xᵀ`` (float64): exact means and standard
  deviations of the projection on any direction ``v`` (``std(X v)² = vᵀ Cov v``);
* a uniform reservoir sample of at most ``max_rows`` rows (Algorithm R): ``mean |X v|`` has no
  closed form in the moments, so it is estimated on the sample — exact while the number of rows
  seen is ``<= max_rows``, an unbiased estimate after that.

Memory per target is ``O(d_in² + max_rows · d_in)`` whatever the number of calibration tokens.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .layout import TargetLayout

SPLITS = ("all", "chosen", "rejected")


@dataclass
class RunningStats:
    """Streaming summary of the rows ``X: (n, d_in)`` seen at one layer for one split."""

    d_in: int
    max_rows: int
    moments: bool = True
    count: int = 0
    total: Tensor | None = None  # (d_in,) float64
    gram: Tensor | None = None  # (d_in, d_in) float64
    buffer: Tensor | None = None  # (max_rows, d_in) float32, allocated once: memory never grows
    filled: int = 0  # rows of ``buffer`` in use
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @torch.no_grad()
    def update(self, rows: Float[Tensor, "n d_in"]) -> None:
        rows = rows.detach().float()
        n = rows.shape[0]
        if n == 0:
            return
        if self.moments:
            rows64 = rows.double()
            if self.total is None:
                self.total = torch.zeros(self.d_in, dtype=torch.float64, device=rows.device)
                self.gram = torch.zeros(
                    self.d_in, self.d_in, dtype=torch.float64, device=rows.device
                )
            self.total += rows64.sum(0)
            self.gram += rows64.T @ rows64
        self._reservoir(rows)
        self.count += n

    @property
    def sample(self) -> Tensor | None:
        """The reservoir rows kept so far, ``(min(count, max_rows), d_in)``."""
        return None if self.buffer is None else self.buffer[: self.filled]

    def _reservoir(self, rows: Tensor) -> None:
        seen = self.count
        if self.buffer is None:
            self.buffer = rows.new_empty(self.max_rows, self.d_in)
        room = self.max_rows - self.filled
        if room > 0:
            take = min(room, rows.shape[0])
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows, seen = rows[take:], seen + take
        if rows.shape[0] == 0:
            return
        # Algorithm R: row number t (1-based) replaces slot u ~ U{0..t-1} when u < max_rows.
        t = torch.arange(seen + 1, seen + rows.shape[0] + 1, dtype=torch.float64)
        u = (torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64) * t).long()
        keep = u < self.max_rows
        if keep.any():
            self.buffer[u[keep].to(self.buffer.device)] = rows[keep.to(rows.device)]

    def projected_std(self, vh: Float[Tensor, "k d_in"]) -> Float[Tensor, " k"]:
        """Population std of ``X · vh_i`` for every row ``vh_i``."""
        if self.count == 0:
            raise ValueError("no calibration rows were collected for this split")
        if self.moments:
            v = vh.double().to(self.gram.device)
            mean = self.total / self.count
            second = ((v @ (self.gram / self.count)) * v).sum(1)  # (k,) vᵀ E[x xᵀ] v
            var = (second - (v @ mean) ** 2).clamp_min(0.0)
            return var.sqrt().float()
        return (self.sample @ vh.float().to(self.sample.device).T).std(0, correction=0)

    def mean_abs_projection(self, vh: Float[Tensor, "k d_in"]) -> Float[Tensor, " k"]:
        """``mean_n |X_n · vh_i|`` on the reservoir sample."""
        if self.count == 0:
            raise ValueError("no calibration rows were collected for this split")
        return (self.sample @ vh.float().to(self.sample.device).T).abs().mean(0)


@dataclass
class Calibration:
    """Per-target, per-split :class:`RunningStats` (``stats[target][split]``)."""

    stats: dict[str, dict[str, RunningStats]]

    @property
    def splits(self) -> set[str]:
        return {split for per in self.stats.values() for split, s in per.items() if s.count}

    def tokens(self, split: str = "all") -> int:
        """Rows seen per target for ``split`` (the same for every target)."""
        counts = {s[split].count for s in self.stats.values() if split in s}
        return max(counts) if counts else 0

    def for_target(self, name: str) -> dict[str, RunningStats]:
        if name not in self.stats:
            raise KeyError(
                f"calibration has no statistics for target {name!r}; collect it with the same "
                f"layout (it covers {len(self.stats)} targets, e.g. {list(self.stats)[:3]})"
            )
        return self.stats[name]

    def nbytes(self) -> int:
        """Bytes held by the statistics (to check that memory does not grow with tokens)."""
        total = 0
        for per in self.stats.values():
            for s in per.values():
                for t in (s.total, s.gram, s.buffer):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


def _rows(x: Tensor, mask: Tensor | None) -> Float[Tensor, "n d_in"]:
    rows = x.reshape(-1, x.shape[-1])  # (n, d_in)
    if mask is None:
        return rows
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"calibration mask has shape {tuple(mask.shape)}, the layer input {tuple(x.shape)}"
        )
    return rows[mask.reshape(-1).to(torch.bool)]


def _split_batch(batch) -> tuple[tuple, dict, Tensor | None]:
    """``(args, kwargs, row mask)`` for one calibration batch (tensor or mapping of kwargs)."""
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        mask = kwargs.pop("calibration_mask", None)
        if mask is None:
            mask = kwargs.get("attention_mask")
        return (), kwargs, mask
    raise TypeError(
        f"calibration batches must be tensors or mappings of model kwargs, got {type(batch).__name__}"
    )


@torch.no_grad()
def collect_calibration(
    model: nn.Module,
    layout: TargetLayout,
    batches: Iterable,
    rejected: Iterable | None = None,
    max_rows: int = 2048,
    moments: bool = True,
    calibration: Calibration | None = None,
) -> Calibration:
    """Run ``model`` on calibration batches and summarise each target's inputs.

    Args:
        model: the base model (run without adapters attached).
        layout: the targets to record (``find_targets`` or ``adapter.layout``).
        batches: input batches — tensors, or mappings of model kwargs. A mapping's
            ``calibration_mask`` (or else its ``attention_mask``), shape ``(batch, seq)``,
            selects the rows that count (e.g. completion tokens only).
        rejected: when given, ``batches`` are the *chosen* completions and these the *rejected*
            ones (needed by ``selection_score="cho_rej_min_std"``).
        max_rows: reservoir size per target and split.
        moments: keep exact first and second moments (``d_in²`` floats per target and split).
        calibration: an earlier result to extend.

    Returns:
        A :class:`Calibration`.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows <= 0:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    if calibration is None:
        calibration = Calibration(
            {t.name: {s: RunningStats(t.d_in, max_rows, moments) for s in SPLITS} for t in layout}
        )
    runs = (
        [("chosen", batches), ("rejected", rejected)]
        if rejected is not None
        else [("all", batches)]
    )
    state: dict = {"split": None, "mask": None}

    def make_hook(name: str):
        def hook(module, args, output):
            rows = _rows(args[0], state["mask"])
            calibration.stats[name][state["split"]].update(rows)
            if state["split"] != "all":
                calibration.stats[name]["all"].update(rows)

        return hook

    handles = [t.module.register_forward_hook(make_hook(t.name)) for t in layout]
    try:
        for split, source in runs:
            state["split"] = split
            n_batches = 0
            for batch in source:
                args, kwargs, state["mask"] = _split_batch(batch)
                model(*args, **kwargs)
                n_batches += 1
            if n_batches == 0:
                raise ValueError(f"calibration split {split!r} received no batches")
    finally:
        for handle in handles:
            handle.remove()
    return calibration
