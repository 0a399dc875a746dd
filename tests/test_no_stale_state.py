"""Nothing in the hot path is cached in a way that can go stale (issue: adapters as nn.Modules).

A factor changed through ``.data``, ``vector_to_parameters``, ``load_state_dict`` or an optimizer
step is seen by the next forward; inference-mode use never poisons later grad-mode use.
"""

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import modlora as ml
from tests import tiny
from tests.helpers import hand_merged, logits


def test_edits_through_data_are_seen(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.5):
        logits(llama, x)  # a forward before the edit
        name = lora.layout.names[3]
        lora.part(name).lora_B.data.mul_(4.0)  # no version bump
        lora.part(lora.layout.names[5]).lora_A.data = torch.randn_like(
            lora.part(lora.layout.names[5]).lora_A
        )  # a new tensor behind the same Parameter
        torch.testing.assert_close(logits(llama, x), logits(hand_merged(llama, [(lora, 1.5)]), x))


def test_vector_to_parameters_and_load_state_dict_are_seen(llama):
    x = tiny.tokens()
    lora, other = tiny.signed_lora(llama, seed=1), tiny.signed_lora(llama, seed=2)
    with lora(llama, c=-0.8):
        logits(llama, x)
        vector_to_parameters(parameters_to_vector(other.parameters()), lora.parameters())
        torch.testing.assert_close(logits(llama, x), logits(hand_merged(llama, [(other, -0.8)]), x))
        lora.load_state_dict(tiny.signed_lora(llama, seed=3).state_dict())
        expected = hand_merged(llama, [(tiny.signed_lora(llama, seed=3), -0.8)])
        torch.testing.assert_close(logits(llama, x), logits(expected, x))


@pytest.mark.parametrize("training_steps", [False, True], ids=["eval", "train_then_eval"])
def test_optimizer_steps_are_seen_by_no_grad_forwards(llama, training_steps):
    """Also when each step runs in training mode and each check in eval mode."""
    x = tiny.tokens()
    lora = tiny.signed_lora(llama)
    opt = torch.optim.AdamW(lora.parameters(), lr=0.05)
    with lora(llama, c=1.0):
        for _ in range(2):
            lora.train(training_steps)
            llama(x).logits.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            lora.eval()
            expected = logits(hand_merged(llama, [(lora, 1.0)]), x)
            torch.testing.assert_close(logits(llama, x), expected)


@pytest.mark.parametrize("per_sample", [False, True])
def test_first_use_under_inference_mode_then_outside(llama, per_sample):
    x = tiny.tokens(batch=2)
    lora = tiny.signed_lora(llama)
    c = torch.tensor([1.0, -1.0]) if per_sample else 1.0
    with torch.inference_mode(), lora(llama, c=c):
        inside = llama(x).logits.clone()
    with lora(llama, c=c):
        torch.testing.assert_close(logits(llama, x), inside)
        loss = llama(x).logits.pow(2).mean()  # grad mode after inference mode
        loss.backward()
    assert all(p.grad is not None for p in lora.parameters())
    lora.set_coeff(-2.0)  # the coefficient tensors were made outside inference mode


def test_frozen_history_across_an_inference_mode_evaluation_then_training(llama):
    x = tiny.tokens()
    hist = ml.HistoryBake(llama, [(tiny.signed_lora(llama, seed=5), 1.0)])
    lora = ml.ModulatedLoRA(llama, r=2, init="signed")
    try:
        with torch.inference_mode():
            llama(x)  # an evaluation while the history is attached
        with lora(llama, c=1.0):
            llama(x).logits.pow(2).mean().backward()  # crashed when a fold was cached in there
        assert all(p.grad is not None for p in lora.parameters())
    finally:
        hist.remove()
