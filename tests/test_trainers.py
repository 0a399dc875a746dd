"""The HF Trainer and accelerate train an attached adapter (and nothing else)."""

import pytest
import torch

import modlora as ml
from tests import tiny


def _base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.mark.slow
def test_hf_trainer_changes_the_adapter_and_not_the_base(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny.llama()
    before = _base_state(model)
    lora = ml.ModulatedLoRA(model, r=2)
    start = {k: v.clone() for k, v in lora.state_dict().items()}
    lora.attach(model, c=1.0)
    x = tiny.tokens(batch=8, seq=6)
    data = [{"input_ids": row, "labels": row} for row in x]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    lora.detach()
    assert _same(model, before)
    changed = [k for k, v in lora.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("lora_B") for k in changed)


def test_accelerate_prepare_trains_the_adapter():
    from accelerate import Accelerator

    model = tiny.llama()
    before = _base_state(model)
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
    assert _same(model, before)
    assert all(not torch.equal(v, start[k]) for k, v in lora.state_dict().items())
