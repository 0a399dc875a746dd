"""Device placement on CUDA (skipped on machines without a GPU)."""

import pytest
import torch

import modlora as ml
from tests import tiny

pytestmark = pytest.mark.gpu


def test_adapter_tensors_follow_each_layer_device():
    model = tiny.llama()
    model.model.layers[2:].to("cuda")  # a split model, like device_map="auto"
    lora = ml.ModulatedLoRA(model, r=2, init="signed")
    for name, p in lora.named_parameters():
        block = lora.layout[name.rsplit(".", 1)[0]].block
        assert p.device.type == ("cuda" if block is not None and block >= 2 else "cpu")


def test_hooked_cuda_model_matches_cpu():
    cpu = tiny.llama()
    lora = ml.ModulatedLoRA(cpu, r=2, init="signed")
    x = tiny.tokens()
    with lora(cpu, c=torch.tensor([1.0, -1.0])), torch.no_grad():
        expected = cpu(x).logits
    gpu = tiny.llama().to("cuda")
    lora_gpu = ml.ModulatedLoRA(gpu, r=2)
    lora_gpu.load_state_dict(lora.state_dict())
    with lora_gpu(gpu, c=torch.tensor([1.0, -1.0])), torch.no_grad():
        got = gpu(x.cuda()).logits.cpu()
    torch.testing.assert_close(
        got, expected, atol=1e-4, rtol=1e-4
    )  # CUDA vs CPU kernels differ in round-off


def test_pissa_svd_runs_on_the_layer_device():
    model = tiny.llama().to("cuda")
    pissa = ml.ModulatedPiSSA(model, r=2)
    u, s, vh = pissa.singular_factors("model.layers.0.self_attn.q_proj")
    assert u.is_cuda and s.is_cuda and vh.is_cuda
