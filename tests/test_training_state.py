"""Resume and fork (modlora/training_state.py) on a deterministic CPU training loop."""

import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modlora as ml
from modlora.checkpoint import CheckpointError
from modlora.training_state import (
    ADAPTER_FILE,
    STATE_FILE,
    capture_rng,
    fork_training,
    restore_rng,
    resume_training,
    save_training_state,
)
from tests import tiny

N = 3  # steps before the save; the uninterrupted run takes 2N


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def make_run(model, alpha=8.0):
    """Adapter (with dropout), AdamW and a warmup-cosine schedule, as at the start of a run."""
    lora = ml.ModulatedLoRA(
        model, r=4, alpha=alpha, targets=("q_proj", "v_proj", "up_proj"), dropout=0.2, init="signed"
    )
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 20))
    )
    return lora, opt, sched


def loss_of(model, lora, x, c):
    with lora(model, c=c):
        logits = model(x).logits  # (batch, seq, vocab)
        return F.cross_entropy(logits[:, :-1].reshape(-1, tiny.VOCAB), x[:, 1:].reshape(-1))


def train_step(model, lora, opt, sched) -> torch.Tensor:
    """One step whose batch, coefficient and dropout masks all come from the global RNGs."""
    lora.train()
    x = torch.randint(0, tiny.VOCAB, (2, 8))  # torch RNG
    c = (1.0 if random.random() < 0.5 else -1.0) * (0.5 + float(np.random.rand()))  # python, numpy
    opt.zero_grad()
    with lora(model, c=c):
        logits = model(x).logits  # (batch, seq, vocab); dropout draws from the torch RNG
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, tiny.VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def params(lora):
    return {k: v.detach().clone() for k, v in lora.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted():
    """2N steps in one go, plus the loss of step 2N + 1."""
    model = tiny.llama()
    seed_all(123)
    lora, opt, sched = make_run(model)
    for _ in range(2 * N):
        train_step(model, lora, opt, sched)
    final = params(lora)
    next_loss = train_step(model, lora, opt, sched)
    return final, next_loss


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """N steps, then a training-state save (shared: tests must not modify it)."""
    tmp_path = tmp_path_factory.mktemp("run")
    model = tiny.llama()
    seed_all(123)
    lora, opt, sched = make_run(model)
    for _ in range(N):
        train_step(model, lora, opt, sched)
    folder = save_training_state(
        tmp_path / "step_3", lora, opt, sched, step=N, extra={"best": 1.5}, c=0.75
    )
    return folder, model, lora


def test_resume_continues_bit_for_bit(saved, uninterrupted):
    folder, _, _ = saved
    final, next_loss = uninterrupted
    seed_all(999)  # a new process: other RNG states, fresh objects with another init
    model = tiny.llama()
    lora, opt, sched = make_run(model)
    state = resume_training(folder, lora, opt, sched)
    assert state.step == N and state.extra == {"best": 1.5}
    assert lora.deployed_c == 0.75 and lora.training
    for _ in range(N):
        train_step(model, lora, opt, sched)
    now = params(lora)
    assert all(torch.equal(now[k], final[k]) for k in final)
    assert torch.equal(train_step(model, lora, opt, sched), next_loss)


def test_resume_without_rng_diverges(saved, uninterrupted):
    folder, _, _ = saved
    final, _ = uninterrupted
    seed_all(999)
    model = tiny.llama()
    lora, opt, sched = make_run(model)
    resume_training(folder, lora, opt, sched, rng=False)
    for _ in range(N):
        train_step(model, lora, opt, sched)
    now = params(lora)
    assert not all(torch.equal(now[k], final[k]) for k in final)  # the RNG state matters


def test_resume_into_a_loaded_adapter(saved, uninterrupted):
    folder, _, _ = saved
    final, _ = uninterrupted
    model = tiny.llama()
    lora = ml.load_adapter(model, folder / ADAPTER_FILE)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 20))
    )
    resume_training(folder, lora, opt, sched)
    for _ in range(N):
        train_step(model, lora, opt, sched)
    now = params(lora)
    assert all(torch.equal(now[k], final[k]) for k in final)


def test_fork_starts_from_the_saved_weights(saved):
    folder, model, source = saved
    x = tiny.tokens(batch=2, seq=8, seed=4)
    torch.manual_seed(5)  # same dropout masks for both train-mode losses
    source.train()
    source_loss = loss_of(model, source, x, 1.0)
    fresh_model = tiny.llama()
    forked = fork_training(folder, fresh_model)
    assert forked.training and forked.extra_meta["forked_from"] == {"path": str(folder), "step": N}
    torch.manual_seed(5)
    assert torch.equal(loss_of(fresh_model, forked, x, 1.0), source_loss)
    fresh, _, _ = make_run(tiny.llama())
    torch.manual_seed(5)
    assert not torch.equal(loss_of(fresh.model, fresh.train(), x, 1.0), source_loss)
    from_file = fork_training(folder / ADAPTER_FILE, tiny.llama())
    assert from_file.extra_meta["forked_from"]["step"] is None
    assert all(
        torch.equal(a, b) for a, b in zip(from_file.parameters(), source.parameters(), strict=True)
    )


def test_rng_capture_restore():
    seed_all(1)
    state = capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------- bad input
def test_resume_refuses_a_different_config(saved):
    folder, _, _ = saved
    lora, opt, sched = make_run(tiny.llama(), alpha=16.0)
    before = params(lora)
    with pytest.raises(
        ValueError, match=r"does not match the saved run.*alpha: saved 8.0, given 16.0"
    ):
        resume_training(folder, lora, opt, sched)
    assert all(torch.equal(v, params(lora)[k]) for k, v in before.items())


def test_resume_refuses_another_parameter_order_or_scheduler(saved):
    folder, _, _ = saved
    lora, _, sched = make_run(tiny.llama())
    shuffled = torch.optim.AdamW(list(lora.parameters())[::-1], lr=1e-2)
    with pytest.raises(ValueError, match="optimizer's parameters differ"):
        resume_training(folder, lora, shuffled, sched)
    lora, opt, _ = make_run(tiny.llama())
    with pytest.raises(ValueError, match="the saved run had scheduler"):
        resume_training(folder, lora, opt, None)


def test_state_from_another_save_is_refused(saved, tmp_path):
    folder = shutil.copytree(saved[0], tmp_path / "copy")
    lora = ml.load_adapter(tiny.llama(), folder / ADAPTER_FILE)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    with torch.no_grad():
        next(lora.parameters()).add_(0.1)
    other = save_training_state(tmp_path / "later", lora, opt, None, step=N + 1)
    shutil.copy(other / STATE_FILE, folder / STATE_FILE)  # mixed files: an interrupted save
    lora2, opt2, sched2 = make_run(tiny.llama())
    with pytest.raises(CheckpointError, match="does not belong to adapter.safetensors"):
        resume_training(folder, lora2, opt2, sched2)
    (folder / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="training_state.pt is missing"):
        resume_training(folder, lora2, opt2, sched2)


def test_save_refuses_foreign_optimizer_params_and_bad_step(tmp_path, llama):
    lora, _, _ = make_run(llama)
    opt = torch.optim.SGD([*lora.parameters(), torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="1 parameter\\(s\\) that are not the adapter's"):
        save_training_state(tmp_path / "x", lora, opt)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save_training_state(tmp_path / "x", lora, opt, step=-1)
    assert not (tmp_path / "x").exists()


def test_fork_refuses_a_history(tmp_path, llama):
    hist = ml.HistoryBake(llama, [(ml.ModulatedLoRA(llama, r=2, init="signed"), 1.0)], attach=False)
    hist.save(tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="frozen HistoryBake: there is nothing to train"):
        fork_training(tmp_path / "h.safetensors", tiny.llama())
