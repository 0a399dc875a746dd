"""Loading pauses Python's cyclic garbage collector and gives it back as it was, on every exit."""

import gc

import pytest

import modlora as ml
from modlora.checkpoint import CheckpointError

from . import tiny


@pytest.mark.parametrize("enabled", [True, False])
def test_load_restores_the_collector_state(tmp_path, enabled, monkeypatch):
    model = tiny.llama()
    path = ml.ModulatedLoRA(model, r=2).save(tmp_path / "a.safetensors")
    seen, during = [], []
    rebuild = ml.ModulatedLoRA.rebuild.__func__

    def spying_rebuild(cls, *args):
        during.append(gc.isenabled())
        return rebuild(cls, *args)

    monkeypatch.setattr(ml.ModulatedLoRA, "rebuild", classmethod(spying_rebuild))
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        adapter = ml.load_adapter(model, path)
        seen.append(gc.isenabled())
        (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100])  # truncated
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            ml.load_adapter(model, tmp_path / "bad.safetensors")
        seen.append(gc.isenabled())
    finally:
        (gc.enable if was else gc.disable)()
    assert isinstance(adapter, ml.ModulatedLoRA)
    assert during == [False]  # paused while the adapter is built
    assert seen == [enabled, enabled]
