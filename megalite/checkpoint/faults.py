"""Test-only fault injection: this process kills itself with SIGKILL at a named point of a save.

`MEGALITE_FAULT=<point>[@step=N][,rank=R]`, e.g. `MEGALITE_FAULT=before_rename@step=4`: the
process of global rank R (any rank if not given) saving the checkpoint of step N (any step if not
given) sends itself SIGKILL when it reaches `<point>`, as `kill -9` or a node failure would stop
it there. The points, in the order a save reaches them (see training.save and store.commit):

    after_rank_files             every file of this rank written, the checkpoint not yet sealed
    before_rename                meta.json written and fsynced in `.tmp-step_N/`, not yet renamed
    after_rename_before_latest   `step_N/` committed, `latest` still names the previous one
    during_prune                 an old checkpoint renamed to `.trash-...`, not yet deleted

Tests only (tests/faults/): never set it in a real run. Unset, `point` costs one environment
lookup, a few times per checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "MEGALITE_FAULT"
POINTS = ("after_rank_files", "before_rename", "after_rename_before_latest", "during_prune")


def point(name: str, *, step: int) -> None:
    """SIGKILL this process here if `MEGALITE_FAULT` names this point (and this step and rank)."""
    spec = os.environ.get(ENV)
    if spec and _matches(spec, name, step=step):
        print(f"{ENV}: SIGKILL at {name} (step {step}, rank {_rank()})", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _matches(spec: str, name: str, *, step: int) -> bool:
    """Whether `spec` selects point `name` at `step` on this rank; a malformed spec raises, so a
    test never passes because its fault silently never fired."""
    target, _, conditions = spec.partition("@")
    if target not in POINTS:
        raise ValueError(f"{ENV}={spec}: unknown point {target!r} (one of {', '.join(POINTS)})")
    want = dict(kv.split("=", 1) for kv in conditions.split(",") if "=" in kv)
    if set(want) - {"step", "rank"} or len(want) != len([kv for kv in conditions.split(",") if kv]):
        raise ValueError(f"{ENV}={spec}: expected <point>[@step=N][,rank=R]")
    return (
        target == name
        and want.get("step", str(step)) == str(step)
        and want.get("rank", _rank()) == _rank()
    )
