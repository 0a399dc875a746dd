"""``all-linear`` names the weight matrices it cannot adapt instead of skipping them in silence."""

import pytest
import torch
from loguru import logger
from torch import nn

import modlora as ml

from . import tiny


class _FusedAsMatrices(nn.Module):
    """DBRX-style experts: all experts' rows stacked in 2-D parameters, no nn.Linear."""

    def __init__(self, d: int, experts: int = 2, ffn: int = 8) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts * ffn, d))  # (E·ffn, d)
        self.w2 = nn.Parameter(torch.randn(experts * ffn, d))  # (E·ffn, d)


def _warnings(build) -> tuple[object, list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        return build(), messages
    finally:
        logger.remove(sink)


def test_weights_no_target_covers_are_named():
    model = tiny.llama()
    for layer in model.model.layers:
        layer.mlp.experts = _FusedAsMatrices(model.config.hidden_size)
    layout, messages = _warnings(lambda: ml.find_targets(model))
    assert len(messages) == 1
    n = 2 * len(model.model.layers)  # w1 and w2 of every layer
    assert f"leaves {n} weight(s) of LlamaForCausalLM unadapted" in messages[0]
    assert "model.layers.0.mlp.experts.w1" in messages[0]
    assert "model.layers.0.mlp.q_proj" not in messages[0]
    assert not any("experts" in name for name in layout.names)  # still not targets
    # linear layers left out by layer_range are adaptable, just not selected: not named
    _, banded = _warnings(lambda: ml.find_targets(model, layer_range=(1, 3)))
    assert len(banded) == 1 and "q_proj" not in banded[0]
    # a selection by pattern says nothing: the user named what they want
    _, quiet = _warnings(lambda: ml.find_targets(model, targets=["q_proj"]))
    assert quiet == []


@pytest.mark.parametrize("build", [tiny.llama, tiny.gpt2, tiny.bert, tiny.mixtral, tiny.gpt_oss])
def test_models_whose_weights_are_all_covered_stay_quiet(build):
    """Embeddings, routers, norms and per-expert biases are not weights an adapter should take."""
    model = build()
    _, messages = _warnings(lambda: ml.ModulatedLoRA(model, r=2))
    assert messages == []


def test_all_linear_taking_the_output_layer_is_said():
    """``exclude`` replaces the default (which skips ``lm_head``): ``all-linear`` then takes the
    output layer, which PEFT's ``all-linear`` never does — said, not refused."""
    model = tiny.llama()
    layout, messages = _warnings(lambda: ml.find_targets(model, exclude=["q_proj"]))
    assert "lm_head" in layout.names
    assert len(messages) == 1 and "output layer 'lm_head'" in messages[0]
    for quiet in (
        lambda: ml.find_targets(model),  # the default exclude skips it
        lambda: ml.find_targets(model, targets=["all-linear", "lm_head"], exclude=[]),  # named
    ):
        _, messages = _warnings(quiet)
        assert messages == []
