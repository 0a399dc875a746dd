"""What a user expects of the core API without reading the code: found by probing it as one.

Each test is a reproducer of a defect that was found that way (and fixed); the probes that
already behaved are listed in the branch's report, not repeated here.
"""

import io
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import modlora as ml
from tests import tiny
from tests.helpers import assert_same_state, logits, model_state, randomized, signed_pissa


@pytest.mark.parametrize("cast", ["half", "double", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "pissa", "history"])
def test_adapter_cast_with_torch_saves_a_file_that_loads(llama, tmp_path, kind, cast):
    """``.half()`` / ``.double()`` are torch's own (DESIGN.md): the checkpoint must record the
    dtype the tensors now have, not the constructor's, or ``load_adapter`` refuses the file."""
    lora = tiny.signed_lora(llama)
    adapter = {
        "lora": lambda: lora,
        "pissa": lambda: signed_pissa(llama, r=2),
        "history": lambda: ml.HistoryBake(llama, [(lora, 1.0)], attach=False),
    }[kind]()
    getattr(adapter, cast)()
    want = next(iter(adapter.state_dict().values())).dtype
    assert adapter.dtype == want
    adapter.save(tmp_path / "a.safetensors")
    same = ml.load_adapter(llama, tmp_path / "a.safetensors")
    if same.attached:  # a history attaches on load, like its constructor
        same.detach()
    assert same.dtype == want
    assert all(t.dtype == want for t in same.state_dict().values())
    torch.testing.assert_close(logits(llama, None, same), logits(llama, None, adapter))


def test_adapter_cast_by_model_half_while_attached_saves_a_file_that_loads(llama, tmp_path):
    """``model.half()`` while attached casts the adapter's parts too (they are in the model)."""
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.0):
        llama.half()
    assert lora.dtype == torch.float16
    lora.save(tmp_path / "a.safetensors")
    assert ml.load_adapter(llama, tmp_path / "a.safetensors").dtype == torch.float16


@pytest.mark.parametrize("c", [1e39, -1e39, torch.tensor([1.0, 1e39], dtype=torch.float64)])
def test_coefficient_beyond_float32_is_refused_naming_c(llama, c):
    """``c`` is kept in float32 tensors: a value that would overflow there is as unusable as
    ``inf`` and must be refused the same way (naming c), not by a bare RuntimeError."""
    lora = tiny.signed_lora(llama)
    before = model_state(llama)
    with pytest.raises(ValueError, match="coefficient c"), lora(llama, c=c):
        pass
    assert not lora.attached
    assert_same_state(llama, before)
    lora.attach(llama, c=1.0)
    with pytest.raises(ValueError, match="coefficient c"):
        lora.set_coeff(c)
    assert lora.c == 1.0
    lora.detach()


@pytest.mark.parametrize("attach", [False, True])
def test_history_bake_pickles_with_its_model(llama, attach):
    """``torch.save(model)`` of a model holding an attached HistoryBake (attached by default on
    construction), and ``torch.save(history)``, work as they do for a LoRA."""
    lora = tiny.signed_lora(llama)
    hist = ml.HistoryBake(llama, [(lora, 1.0)], attach=attach)
    expected = logits(llama, None, None if attach else hist)
    buf = io.BytesIO()
    torch.save(llama if attach else hist, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    if attach:
        torch.testing.assert_close(logits(loaded), expected)
        (copy,) = ml.find_adapters(loaded)
    else:
        copy = loaded
        assert not copy.attached
        torch.testing.assert_close(logits(copy.model, None, copy), expected)
    assert isinstance(copy, ml.HistoryBake) and copy.model is not llama


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pissa_built_in_a_half_dtype_loads_on_its_own_model(llama, tmp_path, dtype):
    """``ModulatedPiSSA(dtype=torch.bfloat16)`` saved and loaded on the very model it was built
    on: the SVD check must allow the rounding of the stored dtype, not call it another base."""
    pissa = signed_pissa(llama, r=2, dtype=dtype)
    pissa.save(tmp_path / "p.safetensors")
    same = ml.load_adapter(llama, tmp_path / "p.safetensors")
    assert same.dtype == dtype
    torch.testing.assert_close(logits(llama, None, same), logits(llama, None, pissa))


def test_pissa_on_another_base_is_still_refused_in_bf16(tmp_path):
    """The looser bf16 tolerance still tells another base apart."""
    pissa = ml.ModulatedPiSSA(tiny.llama(), r=2, dtype=torch.bfloat16)
    pissa.save(tmp_path / "p.safetensors")
    other = tiny.llama(seed=1)
    with pytest.raises(ml.CheckpointError, match="different base model"):
        ml.load_adapter(other, tmp_path / "p.safetensors")


@pytest.mark.parametrize("tie", [False, True])
def test_import_peft_of_a_lora_on_lm_head(tmp_path, tie):
    """PEFT saves a copy of the base ``lm_head`` weight (``lm_head.base_layer.weight``) when
    ``lm_head`` is a target: that copy is the model's own weight, not something a plain LoRA
    cannot represent. The import reproduces PEFT's logits; a copy that differs from the model's
    weight is still refused, leaving the model as it was."""
    torch.manual_seed(5)
    peft_model = get_peft_model(
        tiny.llama(tie_word_embeddings=tie),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True"
        peft_model.save_pretrained(str(tmp_path / "saved"))
    expected = logits(peft_model, tiny.tokens())
    model = tiny.llama(tie_word_embeddings=tie)
    lora = ml.import_peft(model, tmp_path / "saved")
    assert "lm_head" in lora.ranks()
    torch.testing.assert_close(logits(model, None, lora), expected)

    other = tiny.llama(seed=1, tie_word_embeddings=tie)  # another base: its lm_head differs
    before = model_state(other)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight"):
        ml.import_peft(other, tmp_path / "saved")
    assert_same_state(other, before)


def test_rank_and_alpha_patterns_take_peft_style_keys(llama, tmp_path):
    """``rank_pattern={"v_proj": 2}`` means every ``v_proj`` (PEFT's rule: the key matches the end
    of the name), as a user coming from PEFT writes it; an exact target name still wins, and a
    key that matches no target still raises naming it."""
    lora = ml.ModulatedLoRA(
        llama,
        r=4,
        alpha=8,
        rank_pattern={"model.layers.1.self_attn.v_proj": 3, "v_proj": 2},
        alpha_pattern={r"mlp\.(up|down)_proj": 1},
    )
    ranks = lora.ranks()
    assert ranks["model.layers.1.self_attn.v_proj"] == 3
    assert all(ranks[f"model.layers.{i}.self_attn.v_proj"] == 2 for i in (0, 2, 3))
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert lora.part("model.layers.0.mlp.down_proj").factors()[2] == 1 / 4
    assert lora.part("model.layers.0.mlp.gate_proj").factors()[2] == 8 / 4
    lora.save(tmp_path / "a.safetensors")
    same = ml.load_adapter(llama, tmp_path / "a.safetensors")
    assert same.ranks() == ranks
    before = model_state(llama)
    with pytest.raises(ValueError, match=r"rank_pattern.*\['w_proj'\]"):
        ml.ModulatedLoRA(llama, r=4, rank_pattern={"w_proj": 2})
    assert_same_state(llama, before)


def test_save_refuses_an_adapter_of_mixed_dtypes(llama, tmp_path):
    """One part cast on its own: ``save`` refuses, naming the odd tensors, rather than writing a
    file ``load_adapter`` refuses ("never a file that does not load")."""
    lora = tiny.signed_lora(llama)
    name = lora.layout.names[0]
    lora.part(name).half()
    with pytest.raises(ValueError, match=rf"mix dtypes.*{name}\.lora_A: torch.float16"):
        lora.save(tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


class _KeywordCall(nn.Module):
    """A model that calls its linear layer with the input as a keyword (``lin(input=x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(input=x)


def test_linear_layer_called_with_a_keyword_input():
    """``layer(input=x)`` is an ordinary call of an ``nn.Linear``: the hook used ``args[0]`` and
    raised IndexError. The adapter applies (scalar and per-sample ``c``) and calibration records
    as for a positional call."""
    torch.manual_seed(0)
    model, x = _KeywordCall(), torch.randn(3, 4)
    lora = randomized(ml.ModulatedLoRA(model, r=2))
    a, b = lora.delta_factors(c=1.0)["lin"]
    with torch.no_grad():
        base, delta = model(x), (x @ a.T) @ b.T  # (3, 4) each

        with lora(model, c=-1.5):
            torch.testing.assert_close(model(x), base - 1.5 * delta)
        with lora(model, c=torch.tensor([1.0, 0.0, -1.0])):
            torch.testing.assert_close(
                model(x), base + torch.tensor([[1.0], [0.0], [-1.0]]) * delta
            )
    calib = ml.collect_calibration(model, lora.layout, [x])
    pissa = ml.ModulatedPiSSA(model, r=2, selection_score="wanda", calibration=calib)
    assert pissa.ranks() == {"lin": 2}


def test_conv1d_called_with_its_keyword_input():
    """GPT-2's ``Conv1D`` names its input ``x``: ``layer(x=x)`` adapts like ``layer(x)``."""
    model = tiny.gpt2()
    conv = model.transformer.h[0].attn.c_attn
    lora = randomized(ml.ModulatedLoRA(model, r=2))
    x = torch.randn(2, 3, conv.weight.shape[0])  # Conv1D weight: (d_in, d_out)
    with torch.no_grad(), lora(model, c=0.7):
        positional = conv(x)
        keyword = conv(x=x)
    with torch.no_grad():
        base = conv(x)
    assert not torch.equal(positional, base)
    assert torch.equal(keyword, positional)


@pytest.mark.parametrize("kind", ["lora", "pissa"])
def test_a_target_layout_of_another_model_is_refused(kind):
    """``targets=`` may be a layout already made by ``find_targets`` — of *this* model. One made
    on another model (a twin with the same names) was accepted: the adapter then hooked the
    other model's layers (PiSSA took their SVD), and ``with adapter(model)`` left ``model``
    unchanged while changing the other one."""
    model, other = tiny.llama(), tiny.llama(seed=1)
    layout = ml.find_targets(other, targets=("q_proj",))
    before, before_other = model_state(model), model_state(other)
    cls = ml.ModulatedLoRA if kind == "lora" else ml.ModulatedPiSSA
    with pytest.raises(ValueError, match=r"another model.*model\.layers\.0\.self_attn\.q_proj"):
        cls(model, r=2, targets=layout)
    assert_same_state(model, before)
    assert_same_state(other, before_other)
    assert cls(model, r=2, targets=ml.find_targets(model, targets=("q_proj",))).layout.names


def test_calibration_with_a_layout_of_another_model_is_refused():
    """The same mistake in ``collect_calibration`` recorded nothing (the hooks sat on the other
    model) and failed only later, in PiSSA, with "no calibration rows were collected"."""
    model, other = tiny.llama(), tiny.llama(seed=1)
    with pytest.raises(ValueError, match="another model"):
        ml.collect_calibration(model, ml.find_targets(other, targets=("q_proj",)), [tiny.tokens()])
