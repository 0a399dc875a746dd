"""The global random number generators' states, captured and restored (``weights_only``-safe).

Used by :mod:`modlora.training_state` so a resumed run continues the same random stream.
"""

import random

import torch


def capture_rng() -> dict:
    """The global RNG states: torch CPU (and CUDA if present), Python ``random``, NumPy's legacy
    global generator (if NumPy is installed), as tensors and plain values (``weights_only``-safe).
    """
    kind, internal, gauss = random.getstate()
    state: dict = {
        "torch": torch.get_rng_state(),
        "python": {"version": kind, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` captured (missing parts are left as they are)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        npst = state["numpy"]
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
