"""The experiments' loss pieces and metrics, checked on small hand-made tensors."""

import math

import pytest
import torch
from jaxtyping import install_import_hook

with install_import_hook("experiments", "beartype.beartype"):
    from experiments.datasets import Pair
    from experiments.encoding import mean_pool
    from experiments.losses import aggregate_positions, position_kl, soft_nll
    from experiments.metrics import fit_probe, spearman
    from experiments.models import ByteTokenizer
    from experiments.tokenization import pair_batches, tokenize_completions
    from experiments.trainer import make_scheduler, pcgrad


def test_soft_nll_keeps_the_value_scale_and_bounds_the_gradient():
    nll = torch.tensor([0.5, 4.0], requires_grad=True)
    out = soft_nll(nll)
    assert torch.equal(out.detach(), torch.tensor([0.5, 1.0]))
    out.sum().backward()
    assert torch.equal(nll.grad, torch.tensor([1.0, 0.25]))  # 1 / max(nll, 1)


def test_position_kl_is_zero_for_equal_logits_and_top_k_renormalises():
    logits = torch.randn(2, 3, 11)
    assert torch.equal(position_kl(logits, logits, None), torch.zeros(2, 3))
    other = torch.randn(2, 3, 11)
    full = position_kl(other, logits, None)
    assert bool((full >= -1e-6).all())
    # with K = vocabulary size the top-K KL is the full KL
    torch.testing.assert_close(position_kl(other, logits, 11), full)
    # top-1: both renormalised distributions are a point mass, so the KL is 0
    torch.testing.assert_close(position_kl(other, logits, 1), torch.zeros(2, 3))


@pytest.mark.parametrize("how", ["mean", "rmse", "p95", "max"])
def test_aggregate_positions_uses_masked_positions_only_with_finite_gradients(how):
    values = torch.tensor([[1.0, 2.0, 100.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = aggregate_positions(values, mask, how)
    want = {"mean": 1.5, "rmse": math.sqrt(2.5), "p95": 1.95, "max": 2.0}[how]
    torch.testing.assert_close(out[0], torch.tensor(want))
    out.sum().backward()
    assert bool(torch.isfinite(values.grad).all())
    assert values.grad[0, 2] == 0


def test_aggregate_positions_rejects_unknown_modes():
    with pytest.raises(ValueError, match="objective.aggregate"):
        aggregate_positions(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "median")


def test_mean_pool_ignores_padding():
    hidden = torch.arange(12.0).view(1, 4, 3)  # (batch, seq, d)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[1.5, 2.5, 3.5]]))


def test_tokenize_completions_masks_the_completion_and_pads_right():
    tok = ByteTokenizer()
    batch = tokenize_completions(tok, ["ab", ""], ["c", "xyz"], max_length=16)
    assert batch.ids.tolist() == [[97, 98, 99], [120, 121, 122]]
    assert batch.completion.tolist() == [[False, False, True], [True, True, True]]
    long = tokenize_completions(tok, ["abcdef"], ["xy"], max_length=4)
    assert long.ids.tolist() == [[101, 102, 120, 121]]  # the prompt is cut from the left


def test_pair_batches_tokenise_each_row_once_and_pad_both_sides_to_one_length():
    class CountingTokenizer(ByteTokenizer):
        calls = 0

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            CountingTokenizer.calls += 1
            return super().encode(text, add_special_tokens)

    tok = CountingTokenizer()
    pairs = [Pair("ab", "c", "xyz"), Pair("", "hello", "no")]
    cho, rej = pair_batches(tok, pairs, max_length=16)
    # "ab" once per side ("" is not encoded) + 4 completions; tokenising twice would be 12
    assert CountingTokenizer.calls == 6
    pad = tok.pad_token_id
    assert cho.ids.tolist() == [[97, 98, 99, pad, pad], [104, 101, 108, 108, 111]]
    assert rej.ids.tolist() == [[97, 98, 120, 121, 122], [110, 111, pad, pad, pad]]
    assert cho.attention.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert rej.completion.tolist() == [
        [False, False, True, True, True],
        [True, True, False, False, False],
    ]


def test_pcgrad_projects_only_conflicting_gradients():
    a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]
    assert torch.equal(pcgrad(a, b)[0], torch.tensor([1.0, 1.0]))  # orthogonal: plain sum
    a, b = [torch.tensor([1.0, 1.0])], [torch.tensor([-1.0, 0.0])]
    out = pcgrad(a, b)[0]
    # a projected off b: (0, 1); b projected off a: (-0.5, 0.5); their sum
    assert torch.equal(out, torch.tensor([-0.5, 1.5]))


def test_scheduler_warms_up_then_decays_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]
    assert lrs[6] == pytest.approx(0.1)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = (x[:, 0] > 0).long()
    probe = fit_probe(x, y, l2=1e-3, steps=100)
    assert torch.equal((probe.prob(x) > 0.5).long(), y)
