"""The HF ``Trainer`` trains an attached adapter and checkpoints the adapter alone.

:class:`AdapterTrainer` is ``transformers.Trainer`` with three methods changed, so everything
else (arguments, callbacks, DDP / FSDP through accelerate, gradient checkpointing, logging,
``resume_from_checkpoint``) is the Trainer's own:

* ``save_model`` (every checkpoint, and ``trainer.save_model()``) writes
  ``adapter.safetensors`` — the modlora file, loadable with :func:`~modlora.load_adapter` — instead
  of a copy of the base weights; the Trainer still writes its optimizer, scheduler, RNG and
  trainer state next to it;
* resuming (``trainer.train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` copy
  that file's tensors back into the adapter, in place (:func:`~modlora.distributed.load_into`),
  so the optimizer state the Trainer restores applies to the same parameters.

Importing this module needs ``transformers`` (``import modlora`` does not).

Example:
    >>> lora = ml.ModulatedLoRA(model, r=8)
    >>> lora.attach(model, c=1.0)                 # before the Trainer builds its optimizer
    >>> trainer = AdapterTrainer(model=model, adapter=lora, args=args, train_dataset=data)
    >>> trainer.train()                           # checkpoint-N/adapter.safetensors + optimizer.pt
    >>> trainer.train(resume_from_checkpoint=True)
"""

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .distributed import load_into
from .layout import unwrap_model

ADAPTER_FILE = "adapter.safetensors"


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` for an attached modlora adapter (see the module docstring).

    Args:
        *args, **kwargs: what ``transformers.Trainer`` takes (``model=`` the adapted model).
        adapter: the adapter to train, attached to ``model``.

    Raises:
        ValueError: the adapter is not attached to ``model``, or the model has trainable
            parameters outside the adapter (its checkpoints would not hold them).
    """

    def __init__(self, *args, adapter, **kwargs) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is None or unwrap_model(model) is not adapter.model or not adapter.attached:
            raise ValueError(
                "attach the adapter to the Trainer's model (adapter.attach(model, c=...)) before "
                "building the trainer: the Trainer trains the model's trainable parameters"
            )
        own = {id(p) for p in adapter.parameters()}
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
        if other:
            raise ValueError(
                f"the model has trainable parameters outside the adapter ({other[:3]}...): "
                "AdapterTrainer checkpoints only the adapter; freeze them (requires_grad_(False))"
            )
        self.adapter = adapter
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ``adapter.safetensors`` (and ``training_args.bin``) to ``output_dir``.

        Every process calls it (under FSDP the adapter's shards are gathered); the main process
        writes.
        """
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
        self.adapter.save(folder / ADAPTER_FILE)
        if self.args.should_save:
            torch.save(self.args, folder / TRAINING_ARGS_NAME)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        if not path.is_file():
            raise ValueError(
                f"{resume_from_checkpoint} holds no {ADAPTER_FILE}: not a checkpoint written by "
                "AdapterTrainer"
            )
        load_into(self.adapter, path)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(os.fspath(self.state.best_model_checkpoint))
