"""PEFT interop (modlora/peft.py), checked against the real ``peft`` package."""

import json
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import modlora as ml
from tests import tiny
from tests.helpers import assert_same_state, logits, model_state, randomized


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out / deprecation chatter
        yield


def _lora(model):
    """LoRA on a depth band with one target at another rank and alpha."""
    names = ml.find_targets(model, layer_range=(1, 3)).names
    ranks, alphas = {names[0]: 2, names[3]: 6}, {names[3]: 3.0}
    return tiny.signed_lora(model, layer_range=(1, 3), rank_pattern=ranks, alpha_pattern=alphas)


def _pissa(model):
    """PiSSA on a depth band, every other target truncated to rank 2 (per-target ranks)."""
    full = ml.ModulatedPiSSA(model, r=4, layer_range=(1, 3))
    factors = {}
    for i, name in enumerate(full.layout.names):
        u, s, vh = full.singular_factors(name)
        k = 2 if i % 2 else 4
        factors[name] = (u[:, :k], s[:k], vh[:k])
    pissa = ml.ModulatedPiSSA.from_factors(model, factors, r=4, layer_range=(1, 3))
    return randomized(pissa, std=0.3, seed=4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("kind", "c"), [("lora", -1.5), ("pissa", 0.7)])
def test_peft_loads_the_export_to_the_hooked_logits(arch, kind, c, tmp_path):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    adapter = {"lora": _lora, "pissa": _pissa}[kind](model)
    with adapter(model, c=c):
        hooked = logits(model, x)
    assert not torch.equal(hooked, logits(model, x))

    out = ml.export_peft(adapter, tmp_path / "peft", c=c)

    config = json.loads((out / "adapter_config.json").read_text())
    ranks = adapter.ranks()
    assert config["target_modules"] == adapter.layout.names
    assert config["init_lora_weights"] is True and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2} | (
        {6} if kind == "lora" else set()
    )
    assert all(ranks[n] == k for n, k in config["rank_pattern"].items())
    if kind == "pissa":  # exact rank-r LoRA: scaling alpha / r = 1 on every target
        assert config["lora_alpha"] == 4 and config["alpha_pattern"] == config["rank_pattern"]
    peft_model = PeftModel.from_pretrained(tiny.BUILDERS[arch](), str(out))
    torch.testing.assert_close(logits(peft_model, x), hooked)


def test_history_exports_as_one_lora(llama, tmp_path):
    x = tiny.tokens()
    hist = ml.HistoryBake(llama, [(_lora(llama), 1.0), (_pissa(llama), -2.0)], attach=False)
    with hist(llama, c=0.5):
        hooked = logits(llama, x)
    out = ml.export_peft(hist, tmp_path / "peft", c=0.5)
    peft_model = PeftModel.from_pretrained(tiny.llama(), str(out))
    torch.testing.assert_close(logits(peft_model, x), hooked)


def test_export_import_round_trip_scales_with_c(gpt2, tmp_path):
    x = tiny.tokens()
    lora = _lora(gpt2)
    ml.export_peft(lora, tmp_path / "peft", c=2.0)
    back = ml.import_peft(gpt2, tmp_path / "peft")
    with lora(gpt2, c=2.0):
        hooked = logits(gpt2, x)
    with back(gpt2, c=1.0):
        torch.testing.assert_close(logits(gpt2, x), hooked)
    with lora(gpt2, c=-1.0):
        hooked = logits(gpt2, x)
    with back(gpt2, c=-0.5):
        torch.testing.assert_close(logits(gpt2, x), hooked)


def test_export_refuses_an_existing_folder(llama, tmp_path):
    lora = _lora(llama)
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ml.export_peft(lora, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError, match="not written by modlora"):  # the user's folder
        ml.export_peft(lora, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    ml.export_peft(lora, out, overwrite=True)  # an empty folder holds nothing to lose
    ml.export_peft(lora, out, overwrite=True)  # and its own output may be replaced
    assert sorted(p.name for p in out.iterdir()) == [
        ".modlora-manifest.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary folder left


def test_export_needs_a_scalar_or_deployed_c(llama, tmp_path):
    lora = _lora(llama)
    with pytest.raises(ValueError, match="deployed_c"):
        ml.export_peft(lora, tmp_path / "a", c=None)
    with pytest.raises(ValueError, match="scalar c"):
        ml.export_peft(lora, tmp_path / "b", c=torch.tensor([1.0, 2.0]))
    assert not any(tmp_path.iterdir())
    lora.deployed_c = 1.25
    out = ml.export_peft(lora, tmp_path / "c", c=None)
    name = lora.layout.names[0]
    b = load_file(str(out / "adapter_model.safetensors"))[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(b, 1.25 * lora.part(name).lora_B.detach())


def test_export_refuses_names_peft_would_confuse(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.foo = nn.Linear(4, 4)
            self.x = nn.Module()
            self.x.foo = nn.Linear(4, 4)
            self.y = nn.Linear(4, 4)

    net = Net()
    lora = ml.ModulatedLoRA(net, r=2, rank_pattern={"foo": 1})
    with pytest.raises(ValueError, match=r"pattern key 'foo' to module 'x.foo'"):
        ml.export_peft(lora, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------- import
def _peft_folder(arch, tmp_path, **config):
    """A folder saved by PEFT itself, with random nonzero lora_B; returns (folder, PEFT logits)."""
    torch.manual_seed(5)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}[arch]
    peft_model = get_peft_model(
        tiny.BUILDERS[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **config)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "saved"))
    return tmp_path / "saved", logits(peft_model, tiny.tokens())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_import_reproduces_peft_logits(arch, rslora, tmp_path):
    patterns = {"llama": ({"v_proj": 2}, {"down_proj": 5}), "gpt2": ({"c_proj": 2}, {"c_attn": 5})}
    rank_pattern, alpha_pattern = patterns[arch]
    folder, expected = _peft_folder(
        arch, tmp_path, use_rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = logits(model, x)
    lora = ml.import_peft(model, folder)
    assert set(lora.ranks().values()) == {4, 2}
    with lora(model, c=1.0):
        torch.testing.assert_close(logits(model, x), expected)
    with lora(model, c=0.0):
        assert torch.equal(logits(model, x), base)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "LoRA bias"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"some_future_variant": {"on": True}}, "some_future_variant"),
        ({"r": 3}, r"lora_A \(4, \d+\).*metadata says r=3"),
    ],
)
def test_import_refuses_what_it_cannot_represent(changes, message, tmp_path):
    folder, _ = _peft_folder("llama", tmp_path)
    _edit_config(folder, **changes)
    model = tiny.llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=message):
        ml.import_peft(model, folder)
    assert_same_state(model, before)


def test_import_refuses_a_real_dora_folder(tmp_path):
    folder, _ = _peft_folder("llama", tmp_path, use_dora=True)
    model = tiny.llama()
    before = model_state(model)
    with pytest.raises(ValueError, match="DoRA"):
        ml.import_peft(model, folder)
    assert_same_state(model, before)


def test_import_refuses_modules_to_save_weights(tmp_path):
    folder, _ = _peft_folder("llama", tmp_path, modules_to_save=["lm_head"])
    model = tiny.llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"tensors a plain LoRA does not have.*lm_head"):
        ml.import_peft(model, folder)
    assert_same_state(model, before)


def test_import_refuses_other_peft_types(tmp_path):
    peft_model = get_peft_model(
        tiny.llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    )
    peft_model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        ml.import_peft(tiny.llama(), tmp_path / "ia3")


def test_import_refuses_unknown_tensors_and_missing_layers(tmp_path):
    folder, _ = _peft_folder("llama", tmp_path)
    model = tiny.gpt2()  # an adapter for another architecture
    before = model_state(model)
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel: 12 target\(s\) missing.*no module 'model.layers.0"
    ):
        ml.import_peft(model, folder)
    assert_same_state(model, before)
    adapter_file = folder / "adapter_model.safetensors"
    state = load_file(str(adapter_file))
    state["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(state, str(adapter_file))
    with pytest.raises(ValueError, match=r"model.norm.weight"):
        ml.import_peft(tiny.llama(), folder)


def test_import_refuses_non_linear_targets_and_wrapped_models(tmp_path):
    folder, _ = _peft_folder("llama", tmp_path)
    adapter_file = folder / "adapter_model.safetensors"
    state = load_file(str(adapter_file))
    state["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 97)
    state["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(32, 4)
    save_file(state, str(adapter_file))
    with pytest.raises(ValueError, match="embed_tokens.*is a Embedding"):
        ml.import_peft(tiny.llama(), folder)
    wrapped = get_peft_model(tiny.llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="plain base model"):
        ml.import_peft(wrapped.base_model.model, folder)


def test_import_needs_a_peft_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ml.import_peft(tiny.llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        ml.import_peft(tiny.llama(), tmp_path)
