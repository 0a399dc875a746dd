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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .expert_calibration import recording, routed_rows
from .hooks import layer_input
from .layout import TargetLayout, selected

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

    def tokens(self, split: str = "all") -> int:
        """Rows seen per target for ``split`` (the same for every target)."""
        counts = {s[split].count for s in self.stats.values() if split in s}
        return max(counts) if counts else 0

    def for_target(self, name: str, expert: int | None = None) -> dict[str, RunningStats]:
        """The statistics of target ``name`` (of one expert of a fused expert weight)."""
        key = stats_key(name, expert)
        if key not in self.stats:
            raise KeyError(
                f"calibration has no statistics for target {key!r}; collect it with the same "
                f"layout (it covers {len(self.stats)} targets, e.g. {list(self.stats)[:3]})"
            )
        return self.stats[key]

    def nbytes(self) -> int:
        """Bytes held by the statistics (to check that memory does not grow with tokens)."""
        total = 0
        for per in self.stats.values():
            for s in per.values():
                for t in (s.total, s.gram, s.buffer):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


def stats_key(name: str, expert: int | None) -> str:
    """``name``, or ``name[e]`` for expert ``e`` of a fused expert weight."""
    return name if expert is None else f"{name}[{expert}]"


def _flat_mask(mask: Tensor | None, rows: int, where: str) -> Tensor | None:
    """The calibration mask ``(batch, seq)`` over ``rows`` inputs (tokens, flattened)."""
    if mask is None:
        return None
    if mask.numel() != rows:
        raise ValueError(
            f"calibration mask has shape {tuple(mask.shape)}, but {where} sees {rows} rows"
        )
    return mask.reshape(-1).to(torch.bool)


def _rows(x: Tensor, mask: Tensor | None) -> Float[Tensor, "n d_in"]:
    rows = x.reshape(-1, x.shape[-1])  # (n, d_in)
    keep = _flat_mask(mask, rows.shape[0], f"the layer input {tuple(x.shape)}")
    return rows if keep is None else rows[keep]


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
    if isinstance(layout, TargetLayout):
        selected(model, layout, (), None)  # raises for a layout made on another model
    if calibration is None:
        keys = {
            stats_key(t.name, e): t.d_in
            for t in layout
            for e in (range(t.experts) if t.experts else [None])
        }
        calibration = Calibration(
            {
                k: {s: RunningStats(d_in, max_rows, moments) for s in SPLITS}
                for k, d_in in keys.items()
            }
        )
    runs = (
        [("chosen", batches), ("rejected", rejected)]
        if rejected is not None
        else [("all", batches)]
    )
    state: dict = {"split": None, "mask": None}

    def update(key: str, rows: Tensor) -> None:
        calibration.stats[key][state["split"]].update(rows)
        if state["split"] != "all":
            calibration.stats[key]["all"].update(rows)

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            update(name, _rows(layer_input(args, kwargs), state["mask"]))

        return hook

    with ExitStack() as stack:
        handles = [
            t.module.register_forward_hook(make_hook(t.name), with_kwargs=True)
            for t in layout
            if t.param is None
        ]
        stack.callback(lambda: [h.remove() for h in handles])
        for module, names in _experts_modules(layout).items():
            stack.enter_context(_record_experts(module, names, state, update))
        for split, source in runs:
            state["split"] = split
            n_batches = 0
            for batch in source:
                args, kwargs, state["mask"] = _split_batch(batch)
                model(*args, **kwargs)
                n_batches += 1
            if n_batches == 0:
                raise ValueError(f"calibration split {split!r} received no batches")
    return calibration


def _experts_modules(layout: TargetLayout) -> dict[nn.Module, dict[str, str]]:
    """``{experts module: {param: target name}}`` of the layout's fused expert weights."""
    out: dict[nn.Module, dict[str, str]] = {}
    for t in layout:
        if t.param is not None:
            out.setdefault(t.module, {})[t.param] = t.name
    return out


@contextmanager
def _record_experts(module: nn.Module, names: dict[str, str], state: dict, update):
    """Record, per expert, the rows each fused weight of ``module`` is applied to."""
    call: dict = {}

    def pre(mod, args, kwargs):
        index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
        call["index"] = index  # (tokens, top_k) routing of this call
        call["keep"] = _flat_mask(state["mask"], index.shape[0], f"{type(mod).__name__}")

    def record(param: str, expert: int, x: Tensor) -> None:
        tokens = routed_rows(call["index"], expert)
        if tokens.numel() != x.shape[0]:
            raise ValueError(
                f"cannot calibrate {names[param]!r}: expert {expert} was given {x.shape[0]} rows "
                f"but its router picked {tokens.numel()} tokens (an unrecognised experts loop)"
            )
        rows = x if call["keep"] is None else x[call["keep"][tokens.to(x.device)]]
        update(stats_key(names[param], expert), rows.reshape(-1, x.shape[-1]))

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with recording(module, list(names), record):
            yield
    finally:
        handle.remove()
