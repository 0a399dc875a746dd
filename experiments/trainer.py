"""The training loop shared by every objective.

AdamW with betas (0.9, 0.95), a cosine schedule with linear warmup, gradient clipping, optional
PCGrad on the terms an objective names, a validation loss after every epoch with early stopping
on it (the best weights are restored at the end), tqdm progress bars and loguru logging.

The data order of epoch ``e`` comes from a generator seeded with ``seed + e``, so a run resumed
at step ``s`` replays exactly the batches the uninterrupted run would have seen.

With several processes (``world > 1``) every rank draws the same global batch and trains on its
slice (:func:`experiments.parallel.shard`); DDP / FSDP2 average the gradients, and the logged and
validation losses are averaged over ranks so that every rank takes the same decisions.
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from loguru import logger
from tqdm.auto import tqdm

from modlora.distributed import mean_over_ranks

from .parallel import shard

BETAS = (0.9, 0.95)


@dataclass
class FitState:
    """Where a run stands; saved with the training state so a resumed run continues exactly.

    Attributes:
        step: optimizer steps taken.
        best_val: lowest validation loss so far (``inf`` before the first epoch ends).
        best_step: the step at which ``best_val`` was reached.
        bad_epochs: epochs since the last improvement (early stopping counter).
        history: one dict per finished epoch (``epoch``, ``step``, ``train_loss``, ``val_loss``,
            ``lr``, the mean of each loss term).
        losses: the training loss of every step (for plots and the resume/fork checks).
    """

    step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "FitState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95)."""
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pcgrad(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> list[torch.Tensor]:
    """PCGrad for two tasks: when ``g1·g2 < 0`` each is projected onto the other's normal plane.

    Returns the sum of the (projected) gradients, parameter by parameter.
    """
    dot = sum((a * b).sum() for a, b in zip(g1, g2, strict=True))
    if dot >= 0:
        return [a + b for a, b in zip(g1, g2, strict=True)]
    n1 = sum(a.pow(2).sum() for a in g1).clamp_min(1e-20)
    n2 = sum(b.pow(2).sum() for b in g2).clamp_min(1e-20)
    p1 = [a - dot / n2 * b for a, b in zip(g1, g2, strict=True)]
    p2 = [b - dot / n1 * a for a, b in zip(g1, g2, strict=True)]
    return [a + b for a, b in zip(p1, p2, strict=True)]


def backward(terms: dict[str, torch.Tensor], params: list, pcgrad_terms: tuple[str, ...]) -> None:
    """Accumulate gradients of ``sum(terms)`` into ``params`` (PCGrad on ``pcgrad_terms``)."""
    if not pcgrad_terms:
        sum(terms.values()).backward()
        return
    a, b = (terms[k] for k in pcgrad_terms)
    rest = [v for k, v in terms.items() if k not in pcgrad_terms]
    ga = torch.autograd.grad(a, params, retain_graph=True, allow_unused=True)
    gb = torch.autograd.grad(b, params, retain_graph=bool(rest), allow_unused=True)
    ga = [torch.zeros_like(p) if g is None else g for g, p in zip(ga, params, strict=True)]
    gb = [torch.zeros_like(p) if g is None else g for g, p in zip(gb, params, strict=True)]
    for p, g in zip(params, pcgrad(ga, gb), strict=True):
        p.grad = g if p.grad is None else p.grad + g
    if rest:
        sum(rest).backward()


@torch.no_grad()
def validation_loss(objective, batch_size: int, rank: int = 0, world: int = 1) -> float:
    """Mean total loss over the validation split (no gradients, fixed order); with several
    ranks each takes its slice of every batch and the sums are added up over ranks."""
    total, count = 0.0, 0
    for batch in objective.batches("val", batch_size, None):
        n = len(batch)
        if world > 1:
            rows, weight = shard(batch, rank, world)
            terms = objective.terms(rows, "val")  # means over this rank's rows
            total += float(sum(terms.values())) * (len(rows) if weight else 0)  # their sum
        else:
            terms = objective.terms(batch, "val")
            total += float(sum(terms.values())) * n
        count += n
    if world > 1:
        total = mean_over_ranks(total) * world
    return total / max(1, count)


def _terms(objective, batch, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The loss terms of a global batch: this rank's slice, weighted (see :func:`shard`)."""
    if world == 1:
        return objective.terms(batch, "train")
    rows, weight = shard(batch, rank, world)
    return {k: v * weight for k, v in objective.terms(rows, "train").items()}


def _global(value: float, world: int) -> float:
    """A weighted per-rank loss as the loss of the whole batch (the mean over ranks)."""
    return value if world == 1 else mean_over_ranks(value)


def _snapshot(adapter) -> dict[str, torch.Tensor]:
    """The adapter's weights now, as copies: ``state_dict()`` alone returns the live tensors,
    which the optimizer keeps changing in place."""
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def fit(
    adapter,
    objective,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg,
    seed: int,
    state: FitState | None = None,
    on_epoch_end: Callable[[FitState], None] | None = None,
    best_weights: dict | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[FitState, dict]:
    """Train ``adapter`` on ``objective`` until ``cfg.max_steps``, ``cfg.epochs`` or early stop.

    Args:
        adapter: the adapter being trained (its parameters are in ``optimizer``).
        objective: an object with ``batches``, ``n_batches``, ``terms`` and ``pcgrad_terms``.
        optimizer, scheduler: from :func:`make_optimizer` / :func:`make_scheduler`.
        cfg: the ``train`` config (``batch_size``, ``epochs``, ``max_steps``, ``grad_clip``,
            ``patience``, ``min_delta``, ``log_every``, ``progress``).
        seed: data-order seed (epoch ``e`` uses ``seed + e``).
        state: where a resumed run stands (``None``: a fresh run).
        on_epoch_end: called after every epoch's validation (e.g. to save the training state).
        best_weights: the best adapter weights so far (a resumed run's).
        rank, world: this process's rank and the number of processes; with ``world > 1`` the
            objective calls the DDP / FSDP2-wrapped model and each batch is sliced over ranks.

    Returns:
        ``(state, best_weights)``; the adapter holds the best weights when it returns.
    """
    state = state or FitState()
    params = [p for p in adapter.parameters() if p.requires_grad]
    per_epoch = objective.n_batches("train", cfg.batch_size)
    total = min(cfg.max_steps, cfg.epochs * per_epoch)
    best = best_weights if best_weights is not None else _snapshot(adapter)
    progress = cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=total, initial=state.step, desc="train", disable=not progress, leave=False)
    adapter.train()
    start = time.time()
    while state.step < total and not state.stopped_early:
        epoch = state.step // per_epoch
        generator = torch.Generator().manual_seed(seed + epoch)
        skip = state.step - epoch * per_epoch
        sums: dict[str, float] = {}
        n_steps = 0
        for i, batch in enumerate(objective.batches("train", cfg.batch_size, generator)):
            if i < skip:
                continue
            if state.step >= total:
                break
            terms = _terms(objective, batch, rank, world)
            loss = _global(float(sum(v.detach() for v in terms.values())), world)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {state.step}: lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            backward(terms, params, objective.pcgrad_terms)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.losses.append(loss)
            n_steps += 1
            values = {k: _global(float(v.detach()), world) for k, v in terms.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if cfg.log_every and state.step % cfg.log_every == 0:
                parts = " ".join(f"{k}={v:.4f}" for k, v in values.items())
                logger.info(
                    "step {}/{} loss={:.4f} {} lr={:.2e}",
                    state.step,
                    total,
                    loss,
                    parts,
                    scheduler.get_last_lr()[0],
                )
        if n_steps == 0:
            break
        adapter.eval()
        val = validation_loss(objective, cfg.batch_size, rank, world)
        adapter.train()
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": sum(state.losses[-n_steps:]) / n_steps,
            "val_loss": val,
            "lr": scheduler.get_last_lr()[0],
            **{k: v / n_steps for k, v in sums.items()},
        }
        state.history.append(record)
        if val < state.best_val - cfg.min_delta:
            state.best_val, state.best_step, state.bad_epochs = val, state.step, 0
            best = _snapshot(adapter)
        else:
            state.bad_epochs += 1
            if state.bad_epochs >= cfg.patience:
                state.stopped_early = True
        logger.info(
            "epoch {} step {} train_loss={:.4f} val_loss={:.4f} best={:.4f}@{}{}",
            epoch + 1,
            state.step,
            record["train_loss"],
            val,
            state.best_val,
            state.best_step,
            " (early stop)" if state.stopped_early else "",
        )
        if on_epoch_end is not None:
            on_epoch_end(state, best)
    bar.close()
    adapter.load_state_dict(best)
    adapter.eval()
    logger.info(
        "trained {} steps in {:.1f}s (best val {:.4f} at step {})",
        state.step,
        time.time() - start,
        state.best_val,
        state.best_step,
    )
    return state, best
