"""Adapters built on a model on the meta device live on meta and materialise with it — never NaN."""

import pytest
import torch
import transformers as tf

import modlora as ml
from tests import tiny


def _meta_llama():
    config = tiny.llama().config
    with torch.device("meta"):
        return tf.LlamaForCausalLM(config)


def _materialise(meta_model):
    real = tiny.llama()
    meta_model.to_empty(device="cpu")
    result = meta_model.load_state_dict(real.state_dict(), strict=False)
    # only an attached adapter's own tensors may be missing from the base's state dict
    assert all(".modlora_lora." in k for k in result.missing_keys) and not result.unexpected_keys
    return meta_model.eval(), real


def test_lora_on_a_meta_model_lives_on_meta_and_refuses_garbage():
    model = _meta_llama()
    lora = ml.ModulatedLoRA(model, r=2)
    assert all(p.device.type == "meta" for p in lora.parameters())
    model, real = _materialise(model)
    x = tiny.tokens()
    with pytest.raises(ml.AdapterStateError, match="meta device.*reset_parameters"):
        lora.attach(model, c=1.0)
    lora.to_empty(device="cpu")  # memory, but no values yet
    with pytest.raises(ml.AdapterStateError, match="never initialised"), lora(model, c=1.0):
        model(x)
    lora.reset_parameters()
    with torch.no_grad():
        base = model(x).logits
        with lora(model, c=1.0):
            assert torch.equal(model(x).logits, base)  # init="zero": an exact no-op


def test_lora_attached_while_on_meta_materialises_with_the_model():
    model = _meta_llama()
    lora = ml.ModulatedLoRA(model, r=2, init="signed")
    lora.attach(model, c=1.0)
    model, real = _materialise(model)  # to_empty reaches the attached parts too
    assert all(p.device.type == "cpu" for p in lora.parameters())
    x = tiny.tokens()
    with pytest.raises(ml.AdapterStateError, match="never initialised"):
        model(x)
    donor = tiny.signed_lora(real, r=2)
    lora.load_state_dict(donor.state_dict())  # or reset_parameters()
    with torch.no_grad():
        out = model(x).logits
    lora.detach()
    assert torch.isfinite(out).all()
    twin = ml.ModulatedLoRA(model, r=2)  # built on the materialised model
    twin.load_state_dict(donor.state_dict())
    with torch.no_grad(), twin(model, c=1.0):
        assert torch.equal(out, model(x).logits)


def test_svd_kinds_refuse_a_meta_model():
    model = _meta_llama()
    with pytest.raises(TypeError, match="meta device.*materialise the model"):
        ml.ModulatedPiSSA(model, r=2)
    lora = ml.ModulatedLoRA(model, r=2)
    with pytest.raises(ValueError, match="meta device"):
        ml.HistoryBake(model, [(lora, 1.0)])
