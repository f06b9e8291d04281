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


def _counted(fn, calls: list[int]):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def _lone_engines(rank: int, world: int, out: str) -> None:
    """Two engines of one world-of-one run, one as built (no gradient all-reduce) and one with
    DeepSpeed's all-reduce put back: their updates must be the same, bit for bit."""
    import torch

    from megalite.parallel.build import build_model
    from megalite.parallel.engine import build_engine
    from tests.distributed import deepspeed_dp_rank
    from tests.helpers import compose_config

    dims = deepspeed_dp_rank(rank, world)
    cfg = compose_config(["model=tiny", "trainer.seq_len=8", "trainer.micro_batch_size=1",
                          "trainer.global_batch_size=2", "optim.warmup_steps=0",
                          "logging.wandb.mode=disabled"])  # fmt: skip
    results = {}
    for reduce in (False, True):
        torch.manual_seed(0)
        model, loss_fn = build_model(cfg, dims, torch.device("cpu"))
        engine, _ = build_engine(model, cfg, dims)
        results[f"{reduce}_built_with_reduction"] = engine.enable_backward_allreduce
        engine.enable_backward_allreduce = reduce
        calls: list[int] = []
        engine.allreduce_gradients = _counted(engine.allreduce_gradients, calls)
        data = torch.Generator().manual_seed(1)
        for _ in range(2 * engine.gradient_accumulation_steps()):  # two optimizer steps
            x = torch.randint(0, cfg.model.vocab_size, (1, 9), generator=data)
            engine.backward(loss_fn(engine(x[:, :-1]), x[:, 1:]))
            engine.step()
        results[reduce] = ([p.detach().clone() for p in engine.module.parameters()], len(calls))
    torch.save(results, f"{out}/results.pt")


def test_a_world_of_one_skips_the_gradient_all_reduce_and_trains_the_same(tmp_path) -> None:
    import torch

    from tests.distributed import run_world

    run_world(_lone_engines, 1, str(tmp_path))
    results = torch.load(tmp_path / "results.pt")
    assert results["False_built_with_reduction"] is False  # build_engine turned it off
    (skipped, no_calls), (reduced, calls) = results[False], results[True]
    assert (no_calls, calls) == (0, 4)  # DeepSpeed's: once per backward
    assert all(torch.equal(a, b) for a, b in zip(skipped, reduced, strict=True))


def test_only_a_lone_zero0_engine_may_skip_it() -> None:
    from types import SimpleNamespace

    from megalite.parallel.deepspeed_compat import skip_lone_reduction

    two = SimpleNamespace(zero_optimization_stage=lambda: 0, dp_world_size=2)
    with pytest.raises(ValueError, match="gradients of 2 data-parallel ranks must be reduced"):
        skip_lone_reduction(two)
    zero1 = SimpleNamespace(zero_optimization_stage=lambda: 1, dp_world_size=1)
    with pytest.raises(ValueError, match="only a ZeRO 0 engine"):
        skip_lone_reduction(zero1)
