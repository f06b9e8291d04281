"""Every DeepSpeed internal megalite uses (parallel/deepspeed_compat.PRIVATE) exists in the
installed DeepSpeed: a release that moves or renames one fails here, naming it, instead of
deep inside a skipped step, a save or a resume. Instance attributes are looked for where the
class's code (or a base class's) sets them."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from megalite.parallel.deepspeed_compat import PRIVATE, Private


def _class(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _sets(cls: type, name: str) -> bool:
    """Some class of `cls`'s MRO assigns `self.<name>` in its code."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=]*)?=(?!=)")
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


@pytest.mark.parametrize("row", PRIVATE, ids=lambda r: f"{r.owner.rsplit('.', 1)[1]}.{r.name}")
def test_deepspeed_still_has_it(row: Private) -> None:
    import deepspeed

    cls = _class(row.owner)
    if row.kind == "instance attribute":
        found = _sets(cls, row.name)
    elif row.kind == "method":
        found = callable(getattr(cls, row.name, None))
    else:
        found = hasattr(cls, row.name)
    assert found, (
        f"DeepSpeed {deepspeed.__version__}: {row.owner} has no {row.kind} {row.name!r} "
        f"(megalite uses it: {row.why}); update megalite/parallel/deepspeed_compat.py"
    )


def test_only_the_compat_module_takes_deepspeed_privates() -> None:
    """No other module of megalite names one of the private attributes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "megalite"
    private = {r.name for r in PRIVATE if r.name.startswith("_")}
    offenders = [
        f"{path.relative_to(root)}: {name}"
        for path in root.rglob("*.py")
        if path.name != "deepspeed_compat.py"
        for name in private
        if re.search(rf"\.{re.escape(name)}\b", path.read_text())
    ]
    assert offenders == []
