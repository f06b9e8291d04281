"""Unit-by-unit initial weights (model/init.py): a target that is not drawn in place (another
device or dtype, or a cut along the other axis) gets exactly the in-place fp32 draw, chunk by
chunk through the CPU staging buffer."""

from __future__ import annotations

import pytest
import torch

from megalite.model import init
from megalite.model.init import Rule, draw_into


@pytest.mark.parametrize("axis", [0, 1], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float32])
def test_staged_draw_equals_the_in_place_draw(
    axis: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = Rule((37, 24), 0.02, axis=axis, seed=2**32 - 5)  # seeds wrap past 2^32
    reference = torch.empty(rule.shape)
    draw_into(reference, rule, 0)
    # A target of another dtype, or a column cut (not contiguous per unit), goes through the
    # staging buffer; make it hold 5 units so the copy runs in several chunks, the last short.
    monkeypatch.setattr(init, "STAGING_BYTES", 5 * 4 * rule.shape[1 - axis])
    start, stop = 3, 31
    out = torch.empty(rule.shape, dtype=dtype)
    target = out[start:stop] if axis == 0 else out[:, start:stop]
    draw_into(target, rule, start)
    expected = reference[start:stop] if axis == 0 else reference[:, start:stop]
    assert torch.equal(target, expected.to(dtype))


def test_units_are_distinct_streams() -> None:
    rule = Rule((4, 64), 1.0)
    out = torch.empty(rule.shape)
    draw_into(out, rule, 0)
    assert len({tuple(row.tolist()) for row in out}) == 4
