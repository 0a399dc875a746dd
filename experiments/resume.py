"""Resume and fork a run through :mod:`modlora.training_state`.

``train.save_state`` writes ``state/epoch_<k>/`` after every epoch (adapter + optimizer +
scheduler + step + RNG, and the loop's :class:`~experiments.trainer.FitState` and best weights
as the state's ``extra``). ``train.resume_from=<run>/state/epoch_<k>`` continues that run
exactly; ``train.init_from=<state folder or adapter file>`` forks it: the weights only, with a
fresh optimizer, schedule and step count.
"""

from pathlib import Path

from loguru import logger

from modlora.training_state import fork_training, resume_training, save_training_state

from .trainer import FitState


def save(
    state_dir: Path, adapter, optimizer, scheduler, fit_state: FitState, best_weights: dict
) -> Path:
    """Write ``state_dir/epoch_<k>`` for the epoch that just ended."""
    folder = Path(state_dir) / f"epoch_{len(fit_state.history)}"
    save_training_state(
        folder,
        adapter,
        optimizer,
        scheduler,
        step=fit_state.step,
        extra={"fit_state": fit_state.to_dict(), "best_weights": best_weights},
    )
    logger.info("saved the training state to {}", folder)
    return folder


def resume(path, adapter, optimizer, scheduler) -> tuple[FitState, dict]:
    """Load a saved state into ``adapter`` / ``optimizer`` / ``scheduler``; return the loop state."""
    state = resume_training(path, adapter, optimizer, scheduler)
    fit_state = FitState.from_dict(state.extra["fit_state"])
    if fit_state.step != state.step:
        raise ValueError(
            f"train.resume_from={str(path)!r}: step {state.step} vs loop state {fit_state.step}"
        )
    return fit_state, state.extra["best_weights"]


def fork(path, model, kind: str):
    """A new trainable adapter holding the weights saved at ``path`` (a state folder or a file).

    Raises:
        ValueError: the saved adapter is not of kind ``kind`` (``adapter.kind`` of this run).
    """
    adapter = fork_training(path, model)
    if adapter.kind != kind:
        raise ValueError(
            f"train.init_from={str(path)!r} holds a {adapter.kind} adapter but adapter.kind={kind!r}"
        )
    return adapter
