"""The host copies of an asynchronous save (checkpoint/background.py): what `torch.save` of the
copy writes equals what it would have written of the live state, later changes to the state do
not reach the copy, and the next save reuses the buffers."""

from __future__ import annotations

import io
from collections import OrderedDict

import torch

from megalite.checkpoint.background import HostStaging


def saved_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)
    return {
        "module": OrderedDict(a=flat[:6].view(2, 3), b=flat[6:].view(3, 2).t()),  # views of one
        "optimizer": {"state": {0: {"exp_avg": torch.ones(4), "step": torch.tensor(3.0)}}},
        "groups": [{"lr": 0.1, "params": [0]}],
        "shape": (2, 3),
        "note": "x",
    }


def test_copy_saves_the_same_bytes_and_is_independent() -> None:
    live = state()
    staging = HostStaging()
    staging.begin()
    copied = staging.copy(live)
    staging.end()
    assert saved_bytes(copied) == saved_bytes(live)  # one shared storage, same offsets, strides
    assert type(copied["module"]) is OrderedDict and copied["shape"] == (2, 3)
    before = saved_bytes(copied)
    live["module"]["a"].add_(1)  # training goes on
    live["optimizer"]["state"][0]["exp_avg"].mul_(2)
    live["groups"][0]["lr"] = 0.2
    assert saved_bytes(copied) == before


def test_each_file_is_copied_as_it_is_then() -> None:
    """Two files of one save whose tensors share an address (DeepSpeed frees one file's
    temporary clones before making the next file's) are two copies, each of its own data."""
    live = torch.zeros(8)
    staging = HostStaging()
    staging.begin()
    first = staging.copy({"w": live})
    live.add_(1)  # the same storage address, other contents
    second = staging.copy({"w": live})
    staging.end()
    assert torch.equal(first["w"], torch.zeros(8)) and torch.equal(second["w"], torch.ones(8))


def test_next_save_reuses_the_buffers() -> None:
    staging = HostStaging()
    staging.begin()
    first = staging.copy(state())
    staging.end()
    staging.begin()
    second = staging.copy(state())
    staging.end()
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(second["module"]["a"]) == ptr(first["module"]["a"]) == ptr(second["module"]["b"])
    assert ptr(second["optimizer"]["state"][0]["exp_avg"]) == ptr(
        first["optimizer"]["state"][0]["exp_avg"]
    )
