import pytest
import torch
from torch import nn

import modlora as ml
from modlora.pissa import direction_scores, select_directions, tail_depth
from tests import tiny
from tests.helpers import randomized


def _layer_with_spectrum(s: torch.Tensor, d_in: int, seed: int = 0):
    """A one-layer model whose weight is U diag(s) Vh with known U, Vh."""
    g = torch.Generator().manual_seed(seed)
    d_out = s.numel()
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    vh = v[:, :d_out].T  # (d_out, d_in): orthonormal rows
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(s) @ vh)
    return model, u, vh


def _set_delta_s(pissa, value=None):
    with torch.no_grad():
        for _, p in pissa.named_parameters():
            p.copy_(torch.randn_like(p) if value is None else torch.full_like(p, value))


def test_c_zero_and_zero_delta_s_are_bit_identical(llama):
    x = tiny.tokens()
    with torch.no_grad():
        base = llama(x).logits
    pissa = ml.ModulatedPiSSA(llama, r=4)
    with pissa(llama, c=3.0), torch.no_grad():
        assert torch.equal(llama(x).logits, base)  # delta_s = 0
    _set_delta_s(pissa)
    with pissa(llama, c=0.0), torch.no_grad():
        assert torch.equal(llama(x).logits, base)
    with pissa(llama, c=1.0), torch.no_grad():
        assert not torch.equal(llama(x).logits, base)


def test_weights_are_never_modified(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    pissa = ml.ModulatedPiSSA(llama, r=4)
    _set_delta_s(pissa)
    with pissa(llama, c=2.0), torch.no_grad():
        llama(tiny.tokens())
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_lies_in_the_selected_singular_subspace(arch):
    model = tiny.BUILDERS[arch]()
    pissa = ml.ModulatedPiSSA(model, r=3, svd="full", layer_range=(0.5, 1.0))
    _set_delta_s(pissa)
    for name, (a, b) in pissa.delta_factors(1.7).items():
        t = pissa.layout[name]
        w = t.dense_weight().float()
        u_full, s_full, vh_full = torch.linalg.svd(w, full_matrices=False)
        delta = b @ a  # (d_out, d_in)
        pu = u_full[:, :3] @ u_full[:, :3].T  # projector on the top-3 left singular vectors
        pv = vh_full[:3].T @ vh_full[:3]
        torch.testing.assert_close(
            pu @ delta @ pv, delta, atol=1e-5, rtol=1e-4
        )  # fp32 SVD round-off
        u, s, vh = pissa.singular_factors(name)
        torch.testing.assert_close(s, s_full[:3])


def test_hooked_forward_equals_u_diag_vh_formula():
    # The weight is built from known U, Vh: the reference uses those, not the adapter's own SVD.
    # (Each singular pair's sign is arbitrary, but u_i · d_i · vh_i does not depend on it.)
    model, u, vh = _layer_with_spectrum(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), d_in=7)
    pissa = ml.ModulatedPiSSA(model, r=2, svd="full")
    _set_delta_s(pissa)
    x = torch.randn(3, 7)
    ds = pissa.part("0").delta_s
    with torch.no_grad():
        expected = model(x) + x @ (u[:, :2] @ torch.diag(-1.25 * ds) @ vh[:2]).T
        with pissa(model, c=-1.25):
            got = model(x)
    torch.testing.assert_close(got, expected)


def test_r_is_clamped_per_target():
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 8))
    pissa = ml.ModulatedPiSSA(model, r=5, svd="full")
    assert pissa.ranks() == {"0": 3, "1": 3}


def test_randomized_svd_agrees_on_a_decaying_spectrum():
    s = torch.logspace(1, -2, 64)
    model, u, _ = _layer_with_spectrum(s, d_in=96)
    pissa = ml.ModulatedPiSSA(model, r=8, svd="randomized")
    u_r, s_r, _ = pissa.singular_factors("0")
    torch.testing.assert_close(s_r, s[:8], rtol=1e-3, atol=1e-4)  # randomized: approximate values
    agreement = (u[:, :8].T @ u_r).pow(2).sum() / 8  # mean squared cosine of principal angles
    assert agreement > 0.999


# ---------------------------------------------------------------- selection scores


def _stats(rows_all=None, cho=None, rej=None, moments=True):
    from modlora.calibration import RunningStats

    d = (rows_all if rows_all is not None else cho).shape[1]
    out = {s: RunningStats(d, 4096, moments) for s in ("all", "chosen", "rejected")}
    if rows_all is not None:
        out["all"].update(rows_all)
    if cho is not None:
        out["chosen"].update(cho)
        out["rejected"].update(rej)
    return out


def test_s_only_takes_the_largest_singular_values():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert select_directions(direction_scores("s_only", s, torch.eye(4), None), 2).tolist() == [
        0,
        1,
    ]


def test_act_only_and_wanda_follow_their_definitions():
    s = torch.tensor([10.0, 1.0, 0.5, 0.1])
    vh = torch.eye(4)
    # Inputs live almost only along directions 2 and 3: act_only picks them; wanda weighs by S.
    x = torch.randn(500, 4) * torch.tensor([0.01, 0.5, 3.0, 2.0])
    stats = _stats(rows_all=x)
    act = direction_scores("act_only", s, vh, stats)
    torch.testing.assert_close(act, x.abs().mean(0))
    assert select_directions(act, 2).tolist() == [2, 3]
    wanda = direction_scores("wanda", s, vh, stats)
    torch.testing.assert_close(wanda, s * x.abs().mean(0))
    assert select_directions(wanda, 2).tolist() == [1, 2]  # 10*.008 < 1*.4 < .5*2.4 ; .1*1.6


def test_cho_rej_min_std_picks_directions_alive_in_both():
    s = torch.ones(4)
    vh = torch.eye(4)
    cho = torch.randn(400, 4) * torch.tensor([3.0, 0.01, 2.0, 1.0])
    rej = torch.randn(400, 4) * torch.tensor([0.01, 3.0, 2.0, 1.0])
    for moments in (True, False):
        stats = _stats(cho=cho, rej=rej, moments=moments)
        score = direction_scores("cho_rej_min_std", s, vh, stats)
        expected = torch.minimum(cho.std(0, correction=0), rej.std(0, correction=0))
        torch.testing.assert_close(
            score, expected, rtol=1e-4, atol=1e-6
        )  # float64 moments vs fp32 std
        assert select_directions(score, 2).tolist() == [2, 3]


def test_tail_depth():
    assert tail_depth(torch.arange(4), 32) == 0.0
    assert tail_depth(torch.arange(28, 32), 32) == pytest.approx(1.0)


@pytest.mark.parametrize("score", ["act_only", "wanda"])
def test_activation_scores_end_to_end(score):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    model, _, vh = _layer_with_spectrum(s, d_in=6)
    # Calibration inputs along the two weakest singular directions only.
    x = torch.randn(256, 2) @ vh[4:6] * 50.0
    calib = ml.collect_calibration(model, ml.find_targets(model), [x[:128], x[128:]])
    pissa = ml.ModulatedPiSSA(model, r=2, selection_score=score, calibration=calib)
    assert pissa.selected["0"].tolist() == [4, 5]
    assert pissa.tail_depth == pytest.approx((4.5 - 0.5) / 4)


def test_cho_rej_end_to_end():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    model, _, vh = _layer_with_spectrum(s, d_in=4)
    cho = torch.randn(200, 4) @ (torch.diag(torch.tensor([5.0, 0.0, 1.0, 1.0])) @ vh)
    rej = torch.randn(200, 4) @ (torch.diag(torch.tensor([0.0, 5.0, 1.0, 1.0])) @ vh)
    calib = ml.collect_calibration(model, ml.find_targets(model), [cho], rejected=[rej])
    pissa = ml.ModulatedPiSSA(model, r=2, selection_score="cho_rej_min_std", calibration=calib)
    assert pissa.selected["0"].tolist() == [2, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"selection_score": "magic"}, "selection_score"),
        ({"selection_score": "wanda"}, "needs calibration"),
        ({"svd": "qr"}, "svd"),
        ({"r": -1}, "r must be a positive int"),
        ({"selection_score": "wanda", "svd": "randomized", "calibration": "x"}, "calibration|svd"),
    ],
)
def test_bad_arguments_raise(llama, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=f"{match}|parameter"):
        ml.ModulatedPiSSA(llama, **kwargs)


def test_cho_rej_without_split_raises(llama):
    layout = ml.find_targets(llama, layer_range=(3, 4))
    calib = ml.collect_calibration(llama, layout, [tiny.tokens()])
    with pytest.raises(ValueError, match="chosen/rejected split"):
        ml.ModulatedPiSSA(
            llama, r=2, selection_score="cho_rej_min_std", calibration=calib, layer_range=(3, 4)
        )


def test_calibration_missing_a_target_raises(llama):
    calib = ml.collect_calibration(
        llama, ml.find_targets(llama, layer_range=(3, 4)), [tiny.tokens()]
    )
    with pytest.raises(KeyError, match="no statistics for target"):
        ml.ModulatedPiSSA(llama, r=2, selection_score="wanda", calibration=calib)


class _Int8Linear(nn.Linear):
    """A weight-only int8 layer, like bitsandbytes': the weight is not a dense float tensor."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        w = self.weight.detach()
        self.w_scale = w.abs().max() / 127
        self.weight = nn.Parameter((w / self.w_scale).round().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.w_scale, self.bias)


def test_quantized_layer_refused_for_svd_and_model_untouched():
    model = nn.Sequential(_Int8Linear(4, 4))
    before = model[0].weight.clone()
    with pytest.raises(TypeError, match=r"quantized target\(s\) \['0'\]"):
        ml.ModulatedPiSSA(model, r=2)
    assert torch.equal(model[0].weight, before)
    assert not model[0]._forward_hooks


def test_lora_hooks_work_on_a_quantized_layer():
    model = nn.Sequential(_Int8Linear(4, 3))
    assert ml.find_targets(model)["0"].quantized
    lora = randomized(ml.ModulatedLoRA(model, r=2, alpha=4), std=0.5)
    x = torch.randn(2, 4)
    a, b = lora.part("0").lora_A, lora.part("0").lora_B
    with torch.no_grad():
        base = model(x)
        with lora(model, c=2.0):
            got = model(x)
        expected = base + 2.0 * (4 / 2) * (x @ a.T) @ b.T  # c · alpha/r · (x @ A.T) @ B.T
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, base)
