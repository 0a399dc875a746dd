"""What the tests share to check results: a model's output, weight snapshots, and the
independent reference every delta is compared with.

The reference never goes through modlora's factor functions, hooks or merge: each kind's
``ΔW(c)`` is written out here from the adapter's raw tensors (the formulas of DESIGN.md) and
added into a copy of the model's weights in float64::

    lora:    ΔW = c · (alpha / r) · lora_B @ lora_A
    pissa:   ΔW = U · diag(c · delta_s) · Vh
    history: ΔW = c · B @ A          (its factors are the rounds' factors, concatenated)
"""

import copy

import torch
from torch import Tensor, nn

import modlora as ml
from tests import tiny

TRANSPOSED = ("Conv1D", "GptOssExperts")
"""Modules that store their weight as ``([E,] d_in, d_out)``: GPT-2's ``Conv1D`` and GPT-OSS's
fused experts (``x @ W``)."""


def logits(model: nn.Module, x: Tensor | None = None, adapter=None, c=1.0) -> Tensor:
    """The model's output on ``x`` (default ``tiny.tokens()``) without grad: ``logits``, or the
    ``last_hidden_state`` of an encoder; with ``adapter``, inside ``with adapter(model, c=c)``."""
    x = tiny.tokens() if x is None else x
    with torch.no_grad():
        if adapter is None:
            out = model(x)
        else:
            with adapter(model, c=c):
                out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_each_row_alone(model: nn.Module, adapter, x: Tensor, cs: Tensor) -> None:
    """With one coefficient per sample, row ``i`` of the output is sample ``i`` run alone at the
    scalar ``cs[i]``."""
    batched = logits(model, x, adapter, c=cs)
    for i, c in enumerate(cs.tolist()):
        torch.testing.assert_close(batched[i : i + 1], logits(model, x[i : i + 1], adapter, c=c))


def weights(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's ``state_dict``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: nn.Module, before: dict[str, Tensor]) -> bool:
    """The model's ``state_dict`` has exactly the keys and values of ``before``, bit for bit."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def model_state(model: nn.Module) -> tuple:
    """Everything a failure must leave as it was: weights, ``requires_grad`` flags, hooks (forward
    and pre-forward) and the module tree."""
    return (
        weights(model),
        {n: p.requires_grad for n, p in model.named_parameters()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        [n for n, _ in model.named_modules()],
    )


def assert_same_state(model: nn.Module, before: tuple) -> None:
    """The model is as :func:`model_state` found it, weights bit for bit."""
    state, flags, hooks, names = before
    assert same_weights(model, state), "weights changed"
    now = model_state(model)
    assert now[1] == flags, "requires_grad changed"
    assert now[2] == hooks, "hooks left behind"
    assert now[3] == names, "modules left behind"


def randomized(adapter, std: float = 0.1, seed: int = 3):
    """``adapter`` with every parameter drawn from ``N(0, std²)`` after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, std)
    return adapter


def signed_pissa(model: nn.Module, std: float = 0.3, seed: int = 4, **kw) -> ml.ModulatedPiSSA:
    """A ``ModulatedPiSSA`` (``r=4`` unless given) with ``delta_s`` drawn from ``N(0, std²)``."""
    return randomized(ml.ModulatedPiSSA(model, **{"r": 4, **kw}), std=std, seed=seed)


def two_round_history(model: nn.Module) -> ml.HistoryBake:
    """A detached history of a LoRA round on blocks 0-1 at ``c = 1`` and a PiSSA round at -0.5."""
    rounds = [(tiny.signed_lora(model, layer_range=(0, 2)), 1.0), (signed_pissa(model), -0.5)]
    return ml.HistoryBake(model, rounds, attach=False)


# ---------------------------------------------------------------------------- the reference
def hand_delta(kind: str, tensors: dict[str, Tensor], c: float, scale: float = 1.0) -> Tensor:
    """``ΔW(c)`` of one target, ``([E,] d_out, d_in)`` in float64, from its raw tensors
    ``{role: tensor}``; ``scale`` is LoRA's ``alpha / r``."""
    t = {role: v.detach().double() for role, v in tensors.items()}
    if kind == "lora":
        return c * scale * (t["lora_B"] @ t["lora_A"])
    if kind == "pissa":
        return t["U"] @ torch.diag_embed(c * t["delta_s"]) @ t["Vh"]
    if kind == "history":
        return c * (t["B"] @ t["A"])
    raise ValueError(f"no hand-written delta for kind {kind!r}")


def adapter_deltas(adapter, c: float) -> dict[str, Tensor]:
    """``{target name: ΔW(c)}`` of ``adapter`` by :func:`hand_delta`."""
    out = {}
    for name, part in adapter.named_parts():
        tensors = {**dict(part.named_parameters(recurse=False)), **dict(part.named_buffers())}
        scale = 1.0
        if adapter.kind == "lora":
            alpha = adapter.alpha_pattern.get(name, adapter.alpha)
            scale = alpha / tensors["lora_A"].shape[-2]  # alpha / r, r from the tensor itself
        out[name] = hand_delta(adapter.kind, tensors, c, scale)
    return out


def add_deltas(model: nn.Module, deltas: dict[str, Tensor]) -> None:
    """``W += ΔW`` for every ``{target name: ΔW ([E,] d_out, d_in)}``, in ``W``'s own storage
    orientation (``name`` is a layer's, or a fused expert weight's own parameter name)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            if name in modules:
                owner, weight = modules[name], modules[name].weight
            else:
                parent, _, param = name.rpartition(".")
                owner, weight = modules[parent], getattr(modules[parent], param)
            weight += delta.mT if type(owner).__name__ in TRANSPOSED else delta


def hand_merged(model: nn.Module, rounds) -> nn.Module:
    """A copy of ``model``, every attached adapter taken off, with each ``(adapter, c)``'s
    :func:`adapter_deltas` added into its weights."""
    edited = copy.deepcopy(model)
    for attached in ml.find_adapters(edited):  # the copies of the adapters attached to model
        attached.detach()
    for adapter, c in rounds:
        add_deltas(edited, adapter_deltas(adapter, c))
    return edited
