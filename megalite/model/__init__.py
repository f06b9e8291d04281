"""The plain model (no parallelism), its op backends and its cost model.

Names load on first use, so the cost model (`megalite.model.flops`, pure arithmetic) is imported
without torch by the planner."""

from __future__ import annotations

import importlib

_HOMES = {
    "count_params": "flops",
    "flops_per_token": "flops",
    "flops_per_token_6n": "flops",
    "IGNORE_INDEX": "llama",
    "Llama": "llama",
    "TransformerBlock": "llama",
    "cross_entropy": "llama",
    "describe_backends": "ops",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
