"""torch.compile sees adapters come and go, also when the model was compiled first."""

import torch
import torch._dynamo
from torch import nn

import modlora as ml
from tests.helpers import randomized


def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _eager(model, lora, c, x):
    with torch.no_grad(), lora(model, c=c):
        return model(x)


def test_model_compiled_before_the_first_attach_sees_the_adapter():
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(3, 8)
    graphs = []
    compiled = torch.compile(model, backend=_counting_backend(graphs))
    with torch.no_grad():
        base = compiled(x)
    lora = randomized(ml.ModulatedLoRA(model, r=2), std=0.3)
    expected = {c: _eager(model, lora, c, x) for c in (1.0, -2.0)}
    try:
        for _ in range(3):  # enter and leave the block several times
            for c in (1.0, -2.0):
                with torch.no_grad(), lora(model, c=c):
                    torch.testing.assert_close(compiled(x), expected[c])
            with torch.no_grad():
                assert torch.equal(compiled(x), base)  # detached: the base again
    finally:
        torch._dynamo.reset()
    assert not torch.equal(expected[1.0], base)
    assert len(graphs) <= 4  # a graph with and one without the hooks (plus the first, reset)


def test_compiled_model_does_not_recompile_when_c_changes_in_a_with_block():
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(3, 8)
    lora = randomized(ml.ModulatedLoRA(model, r=2), std=0.3)
    graphs = []
    compiled = torch.compile(model, backend=_counting_backend(graphs))
    try:
        with lora(model, c=1.0), torch.no_grad():
            compiled(x)
            first = len(graphs)
            for c in (0.5, -1.0, 2.0):
                lora.set_coeff(c)
                compiled(x)
        assert len(graphs) == first
    finally:
        torch._dynamo.reset()
