"""A new adapter kind touches one file (its own) plus one line of registration.

``FrozenALoRA`` (LoRA-FA: ``A`` a frozen random projection, only ``B`` trained) is written here,
in the test, against the kind protocol only. Checkpoints, loading, the live and offline merge,
PEFT export, histories and training-state resume then work for it without a change to modlora.
"""

import math

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

import modlora as ml
from modlora import checks
from tests import tiny
from tests.helpers import logits


class FrozenAPart(ml.TargetPart):
    def __init__(self, name, r, d_in, d_out, scale, seed, device) -> None:
        super().__init__(name)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("A", (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(device))
        self.B = nn.Parameter(torch.zeros(d_out, r, device=device))
        self.scale = scale

    def factors(self):
        return FrozenALoRA.formula(self.A, self.B, self.scale)


@ml.register_kind
class FrozenALoRA(ml.LowRankAdapter):
    kind = "test_frozen_a_lora"
    roles = ("A", "B")
    factor_roles = ("A", "B")
    config_keys = ("r", "alpha")

    def __init__(self, model, r=4, alpha=8.0, targets=("all-linear",), exclude=("lm_head",),
                 layer_range=None, dtype=torch.float32):  # fmt: skip
        super().__init__(model, ml.find_targets(model, targets, exclude, layer_range))
        self.r, self.alpha, self.dtype = r, float(alpha), dtype
        for i, t in enumerate(self.layout):
            self.add_part(FrozenAPart(t.name, r, t.d_in, t.d_out, alpha / r, i, t.device))
        model.requires_grad_(False)

    @staticmethod
    def formula(a: Tensor, b: Tensor, scale: float):
        return a, b, scale

    def config(self):
        return {"r": self.r, "alpha": self.alpha}

    @classmethod
    def parse_config(cls, meta):
        return {
            "r": checks.positive_int(meta["r"], "r"),
            "alpha": checks.positive_number(meta["alpha"], "alpha"),
            "dtype": checks.float_dtype(meta["dtype"], "dtype"),
        }

    @classmethod
    def target_factors(cls, config, name, tensors):
        return cls.formula(tensors["A"], tensors["B"], config["alpha"] / config["r"])

    @classmethod
    def rebuild(cls, model, layout, config, tensors):
        adapter = cls(model, config["r"], config["alpha"], layout.patterns, layout.exclude,
                      layout.layer_range)  # fmt: skip
        adapter.load_target_tensors(tensors)
        return adapter


def _trained(model):
    adapter = FrozenALoRA(model, layer_range=(1, 3))
    x = tiny.tokens()
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    with adapter(model, c=1.0):
        model(x, labels=x).loss.backward()
        opt.step()
    assert all(p.abs().sum() > 0 for p in adapter.parameters())
    return adapter.eval()


def test_only_b_is_trainable_and_a_is_a_buffer(llama):
    adapter = FrozenALoRA(llama)
    assert [n.rsplit(".", 1)[1] for n, _ in adapter.named_parameters()][:2] == ["B", "B"]
    assert all(n.endswith(".A") for n, _ in adapter.named_buffers())


def test_checkpoint_round_trip_through_the_registry(llama, tmp_path):
    x = tiny.tokens()
    adapter = _trained(llama)
    adapter.save(tmp_path / "fa.safetensors", c=-1.25)
    assert ml.read_metadata(tmp_path / "fa.safetensors")["kind"] == "test_frozen_a_lora"
    loaded = ml.load_adapter(llama, tmp_path / "fa.safetensors")
    assert isinstance(loaded, FrozenALoRA) and loaded.deployed_c == -1.25
    assert torch.equal(logits(llama, x, loaded, -1.25), logits(llama, x, adapter, -1.25))


def test_merge_history_and_peft_export(llama, tmp_path):
    from peft import PeftModel

    x = tiny.tokens()
    adapter = _trained(llama)
    hooked = logits(llama, x, adapter, 2.0)
    report = ml.merge(llama, adapter, c=2.0)
    assert report.applied == report.attempted == len(adapter.layout)
    torch.testing.assert_close(logits(llama, x), hooked)
    ml.unmerge(llama, adapter)
    hist = ml.HistoryBake(llama, [(adapter, 2.0)])
    torch.testing.assert_close(logits(llama, x), hooked)
    hist.remove()
    ml.export_peft(adapter, tmp_path / "peft", c=2.0)
    peft_model = PeftModel.from_pretrained(tiny.llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, x), hooked)


@pytest.mark.slow
def test_offline_merge_uses_the_kinds_own_factors(llama, tmp_path):
    x = tiny.tokens()
    adapter = _trained(llama)
    hooked = logits(llama, x, adapter, 0.5)
    llama.save_pretrained(tmp_path / "base")
    adapter.save(tmp_path / "fa.safetensors")
    ml.merge_checkpoint(tmp_path / "base", tmp_path / "fa.safetensors", tmp_path / "out", c=0.5)
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(merged, x), hooked)


def test_training_state_resume(llama, tmp_path):
    adapter = _trained(llama)
    opt = torch.optim.AdamW(adapter.parameters())
    ml.save_training_state(tmp_path / "state", adapter, opt, step=7)
    fresh = FrozenALoRA(llama, layer_range=(1, 3))
    state = ml.resume_training(tmp_path / "state", fresh, torch.optim.AdamW(fresh.parameters()))
    assert state.step == 7
    for p, q in zip(adapter.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
