"""The HF Trainer and accelerate train an attached adapter (and nothing else).

``AdapterTrainer`` checkpoints the adapter file instead of the base weights, and resuming from
such a checkpoint restores the adapter: the resumed run ends where the uninterrupted one does.
"""

import os

import pytest
import torch

import modlora as ml
from tests import tiny
from tests.helpers import same_weights, weights


def _args(folder, **kw):
    from transformers import TrainingArguments

    defaults = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    return TrainingArguments(output_dir=str(folder), **{**defaults, **kw})


@pytest.mark.slow
def test_hf_trainer_changes_the_adapter_and_not_the_base(tmp_path):
    from transformers import Trainer

    model = tiny.llama()
    before = weights(model)
    lora = ml.ModulatedLoRA(model, r=2)
    start = {k: v.clone() for k, v in lora.state_dict().items()}
    lora.attach(model, c=1.0)
    x = tiny.tokens(batch=8, seq=6)
    data = [{"input_ids": row, "labels": row} for row in x]
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    lora.detach()
    assert same_weights(model, before)
    changed = [k for k, v in lora.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("lora_B") for k in changed)


def test_accelerate_prepare_trains_the_adapter():
    from accelerate import Accelerator

    model = tiny.llama()
    before = weights(model)
    lora = ml.ModulatedLoRA(model, r=2, init="signed")
    start = {k: v.clone() for k, v in lora.state_dict().items()}
    lora.attach(model, c=1.0)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, opt = accelerator.prepare(model, opt)
    x = tiny.tokens()
    accelerator.backward(prepared(x, labels=x).loss)
    opt.step()
    lora.detach()
    assert same_weights(model, before)
    assert all(not torch.equal(v, start[k]) for k, v in lora.state_dict().items())


def _run(folder, seed: int, resume=None):
    """A fresh model and LoRA (``seed``: its initial B), trained by AdapterTrainer."""
    from modlora.hf_trainer import AdapterTrainer

    model = tiny.llama()
    before = weights(model)
    lora = tiny.signed_lora(model, seed=seed)
    lora.attach(model, c=1.5)
    data = [{"input_ids": row, "labels": row} for row in tiny.tokens(batch=8, seq=6)]
    trainer = AdapterTrainer(model=model, adapter=lora, args=_args(folder), train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    lora.detach()
    assert same_weights(model, before)  # only the adapter trained
    return lora


@pytest.mark.slow
def test_adapter_trainer_checkpoints_the_adapter_and_resumes_it(tmp_path):
    full = _run(tmp_path / "full", seed=3)
    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not {f for f in files if f.startswith(("model", "pytorch_model"))}  # no base copy
    final = ml.load_adapter(
        tiny.llama(), tmp_path / "full" / "checkpoint-4" / "adapter.safetensors"
    )
    for name, tensors in full.target_tensors().items():
        for role, t in tensors.items():
            assert torch.equal(final.target_tensors()[name][role], t)

    resumed = _run(tmp_path / "resumed", seed=11, resume=str(ckpt))  # another start: overwritten
    for name, tensors in full.target_tensors().items():
        for role, t in tensors.items():
            torch.testing.assert_close(resumed.target_tensors()[name][role], t, msg=name)


def test_adapter_trainer_refuses_a_detached_adapter_and_other_trainable_weights(tmp_path):
    from modlora.hf_trainer import AdapterTrainer

    model = tiny.llama()
    lora = ml.ModulatedLoRA(model, r=2)
    with pytest.raises(ValueError, match="attach the adapter"):
        AdapterTrainer(model=model, adapter=lora, args=_args(tmp_path))
    lora.attach(model, c=1.0)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters outside the adapter"):
        AdapterTrainer(model=model, adapter=lora, args=_args(tmp_path))


def test_adapter_trainer_refuses_a_checkpoint_without_an_adapter_file(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="holds no adapter.safetensors"):
        _run(tmp_path, seed=3, resume=str(tmp_path / "checkpoint-2"))
