"""Leave a model exactly as it was when an operation on it fails half-way.

:func:`model_rollback` notes every parameter's ``requires_grad`` flag, every module's forward
hooks and registered children; if the block raises (anything, ``KeyboardInterrupt`` included)
they are put back. Weights are not copied: operations that write weights (merge, resume) keep
their own originals.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layout import unwrap_model


@contextmanager
def model_rollback(model: nn.Module, touched=None) -> Iterator[None]:
    """On an exception in the block: flags, hooks and submodules of ``model`` back as they were.

    Args:
        model: the model.
        touched: the modules the block may register children or hooks on (default: all of
            them); the model itself is always included.
    """
    model = unwrap_model(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = list(model.modules()) if touched is None else [model, *touched]
    modules = [
        (m, dict(m._modules), dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in chosen
    ]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, children, hooks, pre_hooks in modules:
            for key in [k for k in module._modules if k not in children]:
                del module._modules[key]
            module._modules.update(children)
            for current, before in (
                (module._forward_hooks, hooks),
                (module._forward_pre_hooks, pre_hooks),
            ):
                for key in [k for k in current if k not in before]:
                    del current[key]
        raise
