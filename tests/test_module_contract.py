"""Adapters are nn.Modules (DESIGN.md, "Adapters are nn.Modules"): torch's own machinery sees them.

While attached, the per-target parts sit in the model's module tree, so ``model.parameters()``
yields the very same ``Parameter`` objects as ``adapter.parameters()``; detached, the model is the
plain base again. A deep copy of an attached model is an independent model.
"""

import copy

import pytest
import torch
from torch import nn

import modlora as ml
from tests import tiny
from tests.helpers import logits


@pytest.mark.parametrize("kind", ["lora", "pissa"])
def test_attached_parameters_are_the_models_own(llama, kind):
    base_keys = set(llama.state_dict())
    adapter = tiny.signed_lora(llama) if kind == "lora" else ml.ModulatedPiSSA(llama, r=2)
    assert isinstance(adapter, nn.Module)
    mine = {id(p) for p in adapter.parameters()}
    assert mine and not mine & {id(p) for p in llama.parameters()}
    adapter.attach(llama, c=1.0)
    in_model = {id(p): n for n, p in llama.named_parameters()}
    assert mine <= set(in_model)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {in_model[i] for i in mine}  # the base stays frozen
    slot = f"modlora_{kind}"
    name = adapter.layout.names[0]
    assert llama.get_submodule(f"{name}.{slot}") is adapter.part(name)
    assert set(llama.state_dict()) - base_keys == {
        f"{name}.{slot}.{role}" for name in adapter.layout.names for role in type(adapter).roles
    }
    adapter.detach()
    assert set(llama.state_dict()) == base_keys
    assert not any(isinstance(m, ml.TargetPart) for m in llama.modules())


def test_state_dict_keys_follow_the_target_names(llama):
    lora = tiny.signed_lora(llama, layer_range=(1, 2))
    keys = list(lora.state_dict())
    assert keys[:2] == [
        "parts.model.layers.1.self_attn.q_proj.lora_A",
        "parts.model.layers.1.self_attn.q_proj.lora_B",
    ]
    assert len(keys) == 2 * len(lora.layout)


def test_torch_to_train_eval_work_on_the_adapter(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama, dropout=0.5)
    assert not lora.training and not lora.part(lora.layout.names[0]).training
    lora.train()
    assert all(p.training for _, p in lora.named_parts())
    lora.eval().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in lora.parameters())
    with lora(llama, c=1.0):
        y64 = logits(llama, x)  # fp32 layers, fp64 adapter: the hook casts both ways
    lora.to(torch.float32)
    with lora(llama, c=1.0):
        torch.testing.assert_close(logits(llama, x), y64)


def test_model_train_turns_on_the_attached_adapters_dropout(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama, dropout=0.5)
    with lora(llama, c=1.0):
        first = logits(llama, x)
        llama.train()  # the parts are submodules of the model now
        assert lora.part(lora.layout.names[0]).training
        assert not torch.equal(logits(llama, x), first)
        llama.eval()
        assert torch.equal(logits(llama, x), first)


def test_an_optimizer_built_from_the_model_trains_the_adapter(llama):
    x = tiny.tokens()
    lora = ml.ModulatedLoRA(llama, r=2)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with lora(llama, c=1.0):
        opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.1)
        llama(x, labels=x).loss.backward()
        opt.step()
    assert any(p.detach().abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    after = llama.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_deepcopy_of_an_attached_model_is_independent(llama):
    x = tiny.tokens()
    base = logits(llama, x)
    lora = tiny.signed_lora(llama)
    lora.attach(llama, c=1.0)
    hooked = logits(llama, x)
    twin = copy.deepcopy(llama)
    (twin_lora,) = ml.find_adapters(twin)
    assert twin_lora is not lora and twin_lora.model is twin and twin_lora.attached
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in llama.parameters()}
    assert torch.equal(logits(twin, x), hooked)
    lora.set_coeff(-1.0)  # the original's c does not reach the copy
    assert torch.equal(logits(twin, x), hooked)
    twin_lora.detach()
    assert torch.equal(logits(twin, x), base)
    assert ml.find_adapters(twin) == [] and twin_lora.part(twin_lora.layout.names[0]) is not None
    assert not torch.equal(logits(llama, x), base)  # the original is still attached
    lora.detach()
    assert torch.equal(logits(llama, x), base)


def test_deepcopy_of_the_adapter_alone_is_a_detached_twin_on_the_same_model(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.0):
        expected = logits(llama, x)
        twin = copy.deepcopy(lora)
    assert twin.model is llama and not twin.attached
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in lora.parameters()}
    with twin(llama, c=1.0):
        assert torch.equal(logits(llama, x), expected)


def test_wrappers_are_looked_through(llama):
    lora = tiny.signed_lora(llama)
    compiled = torch.compile(llama, backend="eager")
    assert ml.find_targets(compiled).names == lora.layout.names  # no "_orig_mod." prefix
    with lora(compiled, c=1.0):
        assert lora.attached


def test_building_another_adapter_keeps_an_attached_one_trainable(llama):
    first = tiny.signed_lora(llama)
    first.attach(llama, c=1.0)
    second = ml.ModulatedLoRA(llama, r=2)  # freezes the base, not the attached adapter
    pissa = ml.ModulatedPiSSA(llama, r=2)
    assert all(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in second.parameters())
    assert all(p.requires_grad for p in pissa.parameters())
    base = [p for n, p in llama.named_parameters() if ".modlora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    first.detach()
