"""The host's reads of values computed on the device, in one place: on a GPU each read waits for
every kernel queued before it (a host-device sync), so the training loop takes at most one per
step (`train/trainer.py`) and this module counts them (`reads`), for the metrics and the tests.
"""

from __future__ import annotations

import torch

reads = 0  # reads so far in this process


def read(value: torch.Tensor) -> list[float]:
    """`value`'s elements as Python floats, flattened: one host-device sync."""
    global reads
    reads += 1
    return [float(x) for x in value.detach().reshape(-1).tolist()]


def read_float(value: torch.Tensor | float) -> float:
    """One value as a float: a sync if it is a tensor (DeepSpeed returns either)."""
    return read(value)[0] if isinstance(value, torch.Tensor) else float(value)
