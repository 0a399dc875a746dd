"""The fast hook paths of modlora/hooks.py: folded-factor cache, in-place add, grad vs no-grad.

The no-grad path folds ``c · scale`` into a cached ``B`` and adds the delta into the layer's own
output with one ``addmm_``; these tests pin down when that cache must be refreshed and when the
output may be written in place.
"""

import pytest
import torch

import modlora as ml
from tests import tiny
from tests.helpers import hand_merged, logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fold_cache_follows_set_coeff_and_in_place_factor_updates(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    lora = tiny.signed_lora(model)
    lora.attach(model, c=1.0)
    torch.testing.assert_close(logits(model, x), logits(hand_merged(model, [(lora, 1.0)]), x))
    lora.set_coeff(-2.0)
    torch.testing.assert_close(logits(model, x), logits(hand_merged(model, [(lora, -2.0)]), x))
    with torch.no_grad():  # an optimizer step changes B in place: same object, new version
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.mul_(3.0)
    torch.testing.assert_close(logits(model, x), logits(hand_merged(model, [(lora, -2.0)]), x))
    lora.detach()


@pytest.mark.parametrize("per_sample", [False, True])
def test_no_grad_and_grad_paths_agree(llama, per_sample):
    x = tiny.tokens(batch=2)
    lora = tiny.signed_lora(llama)
    c = torch.tensor([0.7, -1.3]) if per_sample else 0.7
    with lora(llama, c=c):
        fast = logits(llama, x)
        slow = llama(x).logits  # grad enabled: the differentiable path
        with torch.inference_mode():
            inference = llama(x).logits
    torch.testing.assert_close(fast, slow.detach())
    torch.testing.assert_close(fast, inference)


def test_bf16_model_with_fp32_adapter_matches_reference():
    model = tiny.llama().to(torch.bfloat16)
    x = tiny.tokens()
    lora = tiny.signed_lora(model)
    with lora(model, c=1.5):
        got = logits(model, x)
    assert got.dtype == torch.bfloat16
    # bf16 weights: hooked (delta added in fp32 then rounded) vs edited weights round differently.
    torch.testing.assert_close(
        got, logits(hand_merged(model, [(lora, 1.5)]), x), atol=0.1, rtol=0.05
    )


def test_an_earlier_user_hook_keeps_the_base_output(llama):
    """A hook registered before the adapter may hold the output: it must not change under it."""
    x = tiny.tokens()
    name = "model.layers.1.mlp.down_proj"
    layer = dict(llama.named_modules())[name]
    seen = {}
    early = layer.register_forward_hook(lambda m, a, out: seen.update(early=out, x=a[0]))
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.0):
        late = layer.register_forward_hook(lambda m, a, out: seen.update(late=out))
        logits(llama, x)
        late.remove()
    early.remove()
    with torch.no_grad():
        base = layer(seen["x"])
        part = lora.part(name)  # c = 1, alpha / r = 8 / 4
        adapted = base + 1.0 * (8 / 4) * (seen["x"] @ part.lora_A.T) @ part.lora_B.T
    assert torch.equal(seen["early"], base)  # the early hook still holds the base output
    torch.testing.assert_close(seen["late"], adapted)  # a later hook sees the adapted one


def test_a_global_forward_hook_keeps_the_base_output(llama):
    x = tiny.tokens()
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(llama.named_modules())[name]
    seen = {}

    def global_hook(module, args, out):
        if module is layer:
            seen["out"], seen["x"] = out, args[0]

    lora = tiny.signed_lora(llama)
    handle = torch.nn.modules.module.register_module_forward_hook(global_hook)
    try:
        with lora(llama, c=1.0):
            logits(llama, x)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(seen["out"], layer(seen["x"]))


def test_two_adapters_on_one_layer_add_up(llama):
    x = tiny.tokens()
    one, two = tiny.signed_lora(llama, seed=1), tiny.signed_lora(llama, seed=2)
    with one(llama, c=1.0), two(llama, c=-0.5):
        got = logits(llama, x)
    torch.testing.assert_close(got, logits(hand_merged(llama, [(one, 1.0), (two, -0.5)]), x))


def test_history_coefficient_change_between_grad_forwards_then_one_backward(llama):
    """Frozen history factors use the cached fold in grad mode too: set_coeff between two
    forwards and one backward must equal two backwards (the cache is replaced, not mutated)."""
    x = tiny.tokens(batch=2)
    hist = ml.HistoryBake(llama, [(tiny.signed_lora(llama, seed=5), 1.0)])
    lora = tiny.signed_lora(llama, seed=6)
    lora.train()

    def loss_at(c, sign):
        hist.set_coeff(c)
        return sign * llama(x).logits.pow(2).mean()

    with lora(llama, c=1.0):
        (loss_at(1.0, 1.0) + loss_at(-2.0, -0.5)).backward()
        together = {k: p.grad.clone() for k, p in lora.named_parameters()}
        for p in lora.parameters():
            p.grad = None
        loss_at(1.0, 1.0).backward()
        loss_at(-2.0, -0.5).backward()
        separate = {k: p.grad.clone() for k, p in lora.named_parameters()}
    hist.remove()
    for k in together:
        torch.testing.assert_close(together[k], separate[k])


def test_history_built_under_inference_mode_works(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama)
    factors = lora.delta_factors(2.0)
    with torch.inference_mode():
        factors = {n: (a.clone(), b.clone()) for n, (a, b) in factors.items()}
        hist = ml.HistoryBake.from_factors(llama, factors)
        hist.set_coeff(0.5)  # folding inference-mode factors: recomputed, never cached
        got = llama(x).logits
    hist.remove()
    torch.testing.assert_close(got, logits(hand_merged(llama, [(lora, 1.0)]), x))
