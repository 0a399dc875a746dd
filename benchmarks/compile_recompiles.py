"""Case 6: ``torch.compile`` recompilations when only ``c`` changes.

A counting backend wraps the real one (``aot_eager`` by default) and records every graph dynamo
hands it. After the first call, changing ``c`` with ``set_coeff`` must hand it nothing new: ``c``
lives in a tensor updated in place, and the ``c == 0`` shortcut is skipped while tracing. The
``with adapter(model, c=...)`` form removes and re-registers the hooks on every block, which is a
different program to dynamo; it is measured too, for contrast.
"""

import torch
from torch import nn

from .common import max_abs_diff, signed_lora


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def compile_case(
    model: nn.Module, inputs: dict, backend: str = "aot_eager", coeffs=(-0.5, 2.0, 0.0, 3.0, -1.25)
) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    inner = torch._dynamo.lookup_backend(backend)
    graphs: list[int] = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    lora = signed_lora(model, r=8)
    compiled = torch.compile(model, backend=counting)
    worst = 0.0
    try:
        with torch.no_grad():
            lora.attach(model, c=1.0)
            compiled(**inputs)
            first_call_graphs = len(graphs)
            for c in coeffs:
                lora.set_coeff(c)
                got = _logits(compiled(**inputs))
                worst = max(worst, max_abs_diff(got, _logits(model(**inputs))))
            set_coeff_recompiles = len(graphs) - first_call_graphs

            batch = inputs["input_ids"].shape[0]
            mark = len(graphs)
            lora.set_coeff(torch.linspace(-1.0, 1.0, batch))
            compiled(**inputs)
            first_per_sample = len(graphs) - mark
            mark = len(graphs)
            for shift in (0.5, -2.0, 1.0):
                lora.set_coeff(torch.linspace(-1.0, 1.0, batch) + shift)
                got = _logits(compiled(**inputs))
                worst = max(worst, max_abs_diff(got, _logits(model(**inputs))))
            per_sample_recompiles = len(graphs) - mark
            lora.detach()

            mark = len(graphs)
            for c in coeffs:
                with lora(model, c=c):
                    compiled(**inputs)
            with_block_recompiles = len(graphs) - mark
    finally:
        if lora.attached:
            lora.detach()
        torch._dynamo.reset()
    return {
        "backend": backend,
        "coefficients": [1.0, *coeffs],
        "graphs_first_call": first_call_graphs,
        "recompiles_set_coeff": set_coeff_recompiles,
        "graphs_on_switch_to_per_sample": first_per_sample,
        "recompiles_per_sample_values": per_sample_recompiles,
        "recompiles_with_block": with_block_recompiles,
        "compiled_vs_eager_max_abs": worst,
    }
