"""Rank inference from factor shapes (modlora/ranks.py)."""

import pytest
import torch

from modlora.ranks import check_rank_vector, infer_rank, infer_ranks

NAME = "model.layers.0.self_attn.q_proj"


def test_lora_2d_reads_rank_from_the_right_axes():
    a, b = torch.zeros(3, 32), torch.zeros(64, 3)  # A (r, d_in), B (d_out, r)
    assert infer_rank(NAME, a, b) == 3
    assert infer_rank(NAME, a.shape, b.shape, expected=3, d_in=32, d_out=64) == 3
    assert infer_rank(NAME, (3, 32), (64, 3)) == 3


def test_pissa_u_vh():
    u, vh = torch.zeros(64, 5), torch.zeros(5, 32)  # U (d_out, r), Vh (r, d_in)
    assert infer_rank(NAME, vh, u, down_label="Vh", up_label="U", d_in=32, d_out=64) == 5


def test_expert_3d():
    a, b = torch.zeros(4, 6, 32), torch.zeros(4, 64, 6)  # (experts, r, d_in), (experts, d_out, r)
    assert infer_rank(NAME, a, b, expected=6, d_in=32, d_out=64) == 6


def test_rank_disagreement_names_target_and_shapes():
    with pytest.raises(ValueError, match=r"q_proj.*A \(3, 32\), B \(64, 4\).*rank mismatch"):
        infer_rank(NAME, (3, 32), (64, 4))


def test_transposed_a_is_caught_by_widths():
    # A stored as (d_in, r) by mistake; with d_in == d_out == r nothing else could tell.
    with pytest.raises(ValueError, match=r"rank mismatch"):
        infer_rank(NAME, (32, 4), (64, 4))
    with pytest.raises(ValueError, match=r"A has d_in=4 but the layer has d_in=32"):
        infer_rank(NAME, (4, 4), (4, 4), d_in=32)
    with pytest.raises(ValueError, match=r"B has d_out=4 but the layer has d_out=64"):
        infer_rank(NAME, (4, 32), (4, 4), d_out=64)


def test_metadata_contradiction():
    with pytest.raises(ValueError, match=r"shapes give r=3 but the metadata says r=8"):
        infer_rank(NAME, (3, 32), (64, 3), expected=8)


@pytest.mark.parametrize(
    ("down", "up", "msg"),
    [
        ((3,), (64, 3), "expected A"),
        ((2, 3, 32), (64, 3), "expected A"),
        ((1, 2, 3, 4), (1, 2, 4, 3), "expected A"),
        ((4, 3, 32), (5, 64, 3), "expert counts differ"),
        ((0, 32), (64, 0), "rank is 0"),
    ],
)
def test_bad_layouts(down, up, msg):
    with pytest.raises(ValueError, match=msg):
        infer_rank(NAME, down, up)


def test_vector_and_many():
    check_rank_vector(NAME, "S", torch.zeros(4), 4)
    with pytest.raises(ValueError, match=r"q_proj.*delta_s has shape \(5,\), expected \(4,\)"):
        check_rank_vector(NAME, "delta_s", (5,), 4)
    factors = {"x": ((2, 8), (8, 2)), "y": ((3, 8), (8, 3))}
    assert infer_ranks(factors) == {"x": 2, "y": 3}
    assert infer_ranks(factors, {"x": 2}) == {"x": 2, "y": 3}
    with pytest.raises(ValueError, match=r"'y'.*metadata says r=2"):
        infer_ranks(factors, 2)
