import pytest
import torch
from torch import nn

import modlora as ml
from modlora.blocks import check_layer_range
from tests import tiny


@pytest.mark.parametrize("arch", list(tiny.BUILDERS))
def test_block_list_found_by_structure(arch):
    model = tiny.BUILDERS[arch]()
    prefix, first_target = tiny.BLOCKS[arch]
    blocks = ml.find_block_list(model)
    assert blocks.prefix == prefix and blocks.size == 4
    layout = ml.find_targets(model)
    assert first_target in layout
    assert layout[first_target].block == 0
    assert not any("lm_head" in n for n in layout.names)


@pytest.mark.parametrize("arch", list(tiny.BUILDERS))
def test_layer_range_picks_the_band(arch):
    model = tiny.BUILDERS[arch]()
    layout = ml.find_targets(model, layer_range=(0.25, 0.75))  # 4 blocks -> 1, 2
    blocks = {t.block for t in layout}
    assert blocks - {None} == {1, 2}
    indices = ml.find_targets(model, layer_range=(3, 4))
    assert {t.block for t in indices} - {None} == {3}


def test_gpt2_conv1d_is_a_transposed_target():
    model = tiny.gpt2()
    t = ml.find_targets(model)["transformer.h.0.attn.c_attn"]
    assert t.transposed and (t.d_in, t.d_out) == (32, 96)
    assert t.dense_weight().shape == (96, 32)


def test_minilm_real_weights(minilm_session):
    layout = ml.find_targets(minilm_session, layer_range=(0.2, 0.8))
    assert ml.find_block_list(minilm_session).prefix == "encoder.layer"
    assert {t.block for t in layout} - {None} == {1, 2, 3, 4}  # round(1.2)=1 .. round(4.8)=5
    q = layout["encoder.layer.1.attention.self.query"]
    assert (q.d_in, q.d_out, q.dtype) == (384, 384, torch.float32)
    # Outside the block list, kept when not excluded (DESIGN.md): the pooler.
    assert "pooler.dense" in layout
    assert "pooler.dense" not in ml.find_targets(minilm_session, exclude=("pooler",))


def test_regex_targets_and_exclude(llama):
    layout = ml.find_targets(llama, targets=(r"\.(q|v)_proj$",), exclude=(r"layers\.0\.",))
    assert {n.rsplit(".", 1)[1] for n in layout.names} == {"q_proj", "v_proj"}
    assert all(t.block != 0 for t in layout)


class _Multimodal(nn.Module):
    """Mimics a vision-language model: a vision tower and a larger text stack."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16)) for _ in range(4)
        )
        self.lm_head = nn.Linear(16, 5)


def test_multimodal_uses_the_text_stack():
    model = _Multimodal()
    assert ml.find_block_list(model).prefix == "language_model.layers"
    layout = ml.find_targets(model, layer_range=(0.5, 1.0))
    assert layout.names == ["language_model.layers.2.0", "language_model.layers.3.0"]


def test_real_multimodal_config_uses_text_stack():
    import transformers as tf

    text = dict(tiny.BASE, head_dim=8, vocab_size=300)
    shared = ("hidden_size", "intermediate_size", "num_attention_heads")
    vision = {k: tiny.BASE[k] for k in shared} | dict(
        num_hidden_layers=2, image_size=32, patch_size=8
    )
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    blocks = ml.find_block_list(model)
    assert "language_model" in blocks.prefix and blocks.size == 4
    layout = ml.find_targets(model)
    assert not any("vision" in n for n in layout.names)


def test_pattern_matching_nothing_raises_and_names_it(llama):
    with pytest.raises(ValueError, match=r"nope_proj.*matched no linear layer"):
        ml.find_targets(llama, targets=("q_proj", "nope_proj"))


@pytest.mark.parametrize(
    ("layer_range", "match"),
    [
        ((0.5, 0.5), "empty"),
        ((0.9, 1.0), "empty"),
        ((0.2, 1.5), r"\[0, 1\]"),
        ((3, 9), "out of range"),
    ],
)
def test_bad_layer_range_raises(llama, layer_range, match):
    with pytest.raises(ValueError, match=match):
        ml.find_targets(llama, layer_range=layer_range)


@pytest.mark.parametrize(
    ("layer_range", "match"),
    [
        ((0.8, 0.2), "no block at any depth"),
        ((0.5, 0.5), "no block at any depth"),
        ((2, 2), "no block at any depth"),
        ((-1, 2), "no block at any depth"),
        ((0.2, 1.5), r"\[0, 1\]"),
    ],
)
def test_check_layer_range_refuses_what_is_empty_at_every_depth(layer_range, match):
    with pytest.raises(ValueError, match=match):
        check_layer_range(layer_range)


@pytest.mark.parametrize("layer_range", [(0.2, 0.8), (0.0, 1.0), (0, 1), (3, 9)])
def test_check_layer_range_accepts_what_some_depth_can_hold(layer_range):
    assert check_layer_range(layer_range) is None  # (3, 9) fails later only on a shallower model


def test_layer_range_without_blocks_raises():
    with pytest.raises(ValueError, match="no repeated block list"):
        ml.find_targets(nn.Sequential(nn.Linear(3, 3)), layer_range=(0.0, 1.0))


def test_everything_excluded_raises(llama):
    with pytest.raises(ValueError, match="no target left"):
        ml.find_targets(llama, exclude=(".",))


def test_invalid_regex_raises(llama):
    with pytest.raises(ValueError, match="not a valid regex"):
        ml.find_targets(llama, targets=("q_proj(",))


def test_not_a_module_raises():
    # beartype (active in the tests) or find_targets' own check, both name the parameter.
    with pytest.raises(TypeError, match=r"nn\.Module|parameter 'model'"):
        ml.find_targets("model")
