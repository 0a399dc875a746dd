import pytest
import torch

import modlora as ml
from modlora.calibration import RunningStats
from tests import tiny


def test_statistics_match_the_rows_seen(llama):
    layout = ml.find_targets(llama, targets=(r"layers\.1\.self_attn\.q_proj$",))
    seen = []
    handle = layout["model.layers.1.self_attn.q_proj"].module.register_forward_hook(
        lambda m, args, out: seen.append(
            args[0].reshape(-1, args[0].shape[-1]).clone()
        )  # (n, d_in)
    )
    batches = [tiny.tokens(seed=s) for s in range(3)]
    calib = ml.collect_calibration(llama, layout, batches)
    handle.remove()
    x = torch.cat(seen).double()
    stats = calib.stats["model.layers.1.self_attn.q_proj"]["all"]
    assert stats.count == x.shape[0] == calib.tokens()
    torch.testing.assert_close(stats.total, x.sum(0))
    torch.testing.assert_close(stats.gram, x.T @ x)
    vh = torch.linalg.qr(torch.randn(32, 32))[0].T
    # fewer rows than the reservoir: the sample is every row, the estimate exact
    torch.testing.assert_close(stats.mean_abs_projection(vh), (x.float() @ vh.T).abs().mean(0))
    torch.testing.assert_close(
        stats.projected_std(vh), (x.float() @ vh.T).std(0, correction=0), rtol=1e-4, atol=1e-5
    )  # float64 vs fp32


def test_attention_mask_drops_padding(llama):
    layout = ml.find_targets(llama, targets=(r"layers\.0\.mlp\.up_proj$",))
    x = tiny.tokens(batch=2, seq=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    calib = ml.collect_calibration(llama, layout, [{"input_ids": x, "attention_mask": mask}])
    assert calib.tokens() == 8
    completion = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
    calib = ml.collect_calibration(
        llama, layout, [{"input_ids": x, "attention_mask": mask, "calibration_mask": completion}]
    )
    assert calib.tokens() == 3


def test_memory_is_flat_in_the_number_of_tokens():
    sizes = {}
    for n in (100, 1_000, 10_000, 100_000):  # 100 < max_rows: the reservoir is allocated at once
        stats = RunningStats(d_in=16, max_rows=512)
        for chunk in torch.randn(n, 16).split(1000):
            stats.update(chunk)
        sizes[n] = sum(
            t.numel() * t.element_size() for t in (stats.total, stats.gram, stats.buffer)
        )
        assert stats.count == n and stats.sample.shape == (min(n, 512), 16)
    assert sizes[100] == sizes[1_000] == sizes[10_000] == sizes[100_000]


def test_reservoir_is_a_uniform_sample():
    stats = RunningStats(d_in=1, max_rows=2000, moments=False)
    values = torch.arange(20_000, dtype=torch.float32)[:, None]
    for chunk in values.split(500):
        stats.update(chunk)
    sample = stats.sample[:, 0]
    assert sample.unique().numel() == 2000  # no row kept twice
    # Uniform over the stream: the sample mean sits near the stream mean (std of the mean ≈ 129).
    assert abs(sample.mean().item() - 9999.5) < 600
    first_half = (sample < 10_000).float().mean().item()
    assert 0.45 < first_half < 0.55


def test_split_counts_and_bad_inputs(llama):
    layout = ml.find_targets(llama, layer_range=(3, 4))
    calib = ml.collect_calibration(
        llama, layout, [tiny.tokens(seed=1)], rejected=[tiny.tokens(seed=2), tiny.tokens(seed=3)]
    )
    assert (
        calib.tokens("chosen") == 14
        and calib.tokens("rejected") == 28
        and calib.tokens("all") == 42
    )
    with pytest.raises(ValueError, match="'rejected' received no batches"):
        ml.collect_calibration(llama, layout, [tiny.tokens()], rejected=[])
    with pytest.raises(TypeError, match="tensors or mappings|parameter"):
        ml.collect_calibration(llama, layout, ["text"])
    with pytest.raises(ValueError, match="max_rows"):
        ml.collect_calibration(llama, layout, [tiny.tokens()], max_rows=0)
    assert not any(t.module._forward_hooks for t in layout)  # hooks removed even on errors
