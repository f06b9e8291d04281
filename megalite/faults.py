"""Test-only fault injection: a process kills itself at a named point of a save, or a step's loss
turns bad, as real faults would.

`MEGALITE_FAULT=<point>[@step=N][,rank=R]`, e.g. `MEGALITE_FAULT=before_rename@step=4`: the
process of global rank R (any rank if not given) saving the checkpoint of step N (any step if not
given) sends itself SIGKILL when it reaches `<point>`, as `kill -9` or a node failure would stop
it there. The points, in the order a save reaches them (see training.save and store.commit):

    after_rank_files             every file of this rank written, the checkpoint not yet sealed
    before_rename                meta.json written and fsynced in `.tmp-step_N/`, not yet renamed
    after_rename_before_latest   `step_N/` committed, `latest` still names the previous one
    during_prune                 an old checkpoint renamed to `.trash-...`, not yet deleted

`MEGALITE_FAULT=nan_loss@window=W` / `spike_loss@window=W`: the loss of the step whose batch holds
global window W of the data stream becomes NaN / 100 times larger (see `bad_loss`): a bad batch,
which the anomaly policy must survive (trainer.anomaly).

`MEGALITE_FAULT=startup_hang@phase=P[,rank=R]`: start-up phase P (its name with `_` for spaces,
e.g. `model_build`; see train/watchdog.StartupWatchdog) never ends, as a stale lock or a peer that
never joins would hold it.

Tests only (tests/faults/): never set it in a real run. Unset, `point` costs one environment
lookup, a few times per checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "MEGALITE_FAULT"
SAVE_POINTS = ("after_rank_files", "before_rename", "after_rename_before_latest", "during_prune")
LOSS_POINTS = ("nan_loss", "spike_loss")
POINTS = SAVE_POINTS + LOSS_POINTS + ("startup_hang",)


def point(name: str, *, step: int) -> None:
    """SIGKILL this process here if `MEGALITE_FAULT` names this point (and this step and rank)."""
    spec = os.environ.get(ENV)
    if spec and _matches(spec, name, step=step):
        print(f"{ENV}: SIGKILL at {name} (step {step}, rank {_rank()})", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def bad_loss(loss: float, *, windows: range) -> float:
    """`loss`, or NaN / 100·loss if `MEGALITE_FAULT` names a loss point at a window in `windows`
    (the global windows of this step's batch)."""
    spec = os.environ.get(ENV)
    if not spec or spec.partition("@")[0] not in LOSS_POINTS:
        return loss
    window = _conditions(spec).get("window")
    if window is None or int(window) not in windows:
        return loss
    return float("nan") if spec.startswith("nan_loss") else 100.0 * loss


def startup_hang(phase: str) -> None:
    """Block forever if `MEGALITE_FAULT` names start-up phase `phase` (and this rank)."""
    spec = os.environ.get(ENV)
    if not spec or spec.partition("@")[0] != "startup_hang":
        return
    want = _conditions(spec)
    if want.get("phase") == phase.replace(" ", "_") and want.get("rank", _rank()) == _rank():
        print(f"{ENV}: start-up phase {phase!r} hangs (rank {_rank()})", file=sys.stderr)
        while True:
            time.sleep(3600)


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _matches(spec: str, name: str, *, step: int) -> bool:
    """Whether `spec` selects point `name` at `step` on this rank; a malformed spec raises, so a
    test never passes because its fault silently never fired."""
    target = spec.partition("@")[0]
    want = _conditions(spec)
    return (
        target == name
        and want.get("step", str(step)) == str(step)
        and want.get("rank", _rank()) == _rank()
    )


def _conditions(spec: str) -> dict[str, str]:
    target, _, conditions = spec.partition("@")
    if target not in POINTS:
        raise ValueError(f"{ENV}={spec}: unknown point {target!r} (one of {', '.join(POINTS)})")
    pairs = [kv for kv in conditions.split(",") if kv]
    want = dict(kv.split("=", 1) for kv in pairs if "=" in kv)
    if set(want) - {"step", "rank", "window", "phase"} or len(want) != len(pairs):
        raise ValueError(
            f"{ENV}={spec}: expected <point>[@step=N][,rank=R], <point>@window=W or "
            "startup_hang@phase=P[,rank=R]"
        )
    return want
