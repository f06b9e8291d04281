"""Start `n` local worker processes, the way torchrun would, and fail fast when one fails.

Each child gets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
so the worker code is the same whether megalite, torchrun or srun started it. If any child exits
with an error, the others are terminated and the first error is re-raised in the parent: nothing
is left waiting in a collective. A child that finished exits at once (`os._exit(0)`), without the
interpreter's teardown. A child that ends itself on purpose with a message for the user (a start-up
phase past its deadline) leaves the message in `MEGALITE_FAILURE_DIR` (see rank/launcher.py), and
the launcher stops the job with that one line; a child killed by a signal is named (`RankExited`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megalite.rank.launcher import FAILURE_DIR, LOCAL_CHILD

log = logging.getLogger(__name__)
SERVER = "megalite.cluster.forkserver"  # what the ranks' server imports once (see that module)
SERVER_IGNORES = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
GRACE_S = 3.0


class RankExited(RuntimeError):
    """A rank ended without raising: killed (kill -9, the OOM killer), or it ended itself and
    said why (`report_failure`; then `reported` is True and the message is its line)."""

    def __init__(self, message: str, *, reported: bool) -> None:
        super().__init__(message)
        self.reported = reported


def _exited(e: mp.ProcessExitedException, failures: Path) -> RankExited:
    reported = _first_report(failures)
    if reported is not None:
        return RankExited(reported, reported=True)
    how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with {e.exit_code}"
    return RankExited(
        f"rank {e.error_index} (pid {e.error_pid}) {how}; the other ranks were stopped",
        reported=False,
    )


def _first_report(folder: Path) -> str | None:
    reports = sorted(folder.glob("rank_*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    return reports[0].read_text() if reports else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    local_rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    failures: str,
    args: tuple,
) -> None:
    os.environ.update(
        **{LOCAL_CHILD: "1", FAILURE_DIR: failures},
        RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)
    # Done: skip the interpreter's teardown, where C++ threads of libraries that outlive their
    # Python owners can abort a process that has finished its work (see env.release_distributed).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start_processes(
    fn: Callable[..., Any], *, nprocs: int, args: tuple = (), join: bool = True
) -> mp.ProcessContext | None:
    """torch's `start_processes` for `fn(index, *args)`, the processes forked from a server that
    imported torch once (`forkserver`, module SERVER) rather than started afresh (`spawn`). Each
    gets this process's environment as it is now (the server's is the one it started with) and
    the default action of the signals the server ignores."""
    mp.set_forkserver_preload([SERVER])
    return mp.start_processes(
        _forked,
        args=(fn, dict(os.environ), args),
        nprocs=nprocs,
        join=join,
        start_method="forkserver",
    )


def _forked(index: int, fn: Callable[..., Any], env: dict[str, str], args: tuple) -> None:
    restore_signals()
    os.environ.clear()
    os.environ.update(env)
    fn(index, *args)


def restore_signals() -> None:
    """The default action of the signals the ranks' server ignores (see SERVER)."""
    for signum in SERVER_IGNORES:
        signal.signal(signum, signal.SIG_DFL)


def spawn(fn: Callable[..., Any], *, nprocs: int, args: tuple = ()) -> None:
    """Run `fn(*args)` in `nprocs` new processes (`start_processes`) and wait for all.

    SIGTERM, SIGUSR1 or SIGUSR2 sent to this process asks the ranks to checkpoint and stop
    (see rank/signals.py): it is passed on to them, SIGTERM as SIGUSR1, since a child's SIGTERM
    is what ends it when a sibling has failed.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megalite-failures-") as failures:
        ctx = start_processes(
            _child, nprocs=nprocs, args=(fn, nprocs, port, failures, args), join=False
        )
        assert ctx is not None
        with _forwarding_stop_signals(ctx.processes):
            # When one rank fails the others get GRACE_S to end by themselves (and log why), then
            # SIGTERM, then after GRACE_S more SIGKILL: a rank stuck in C code still goes.
            try:
                while not ctx.join(grace_period=GRACE_S):
                    pass
            except mp.ProcessExitedException as e:
                raise _exited(e, Path(failures)) from None


@contextmanager
def _forwarding_stop_signals(children: list[Any]) -> Iterator[None]:
    def forward(signum: int, _frame: Any) -> None:
        to = signal.SIGUSR1 if signum == signal.SIGTERM else signum
        log.info(
            "%s: asking the ranks to checkpoint and stop (%s)",
            signal.Signals(signum).name,
            signal.Signals(to).name,
        )
        for child in children:
            if child.is_alive():
                os.kill(child.pid, to)

    stop_signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    previous = {s: signal.signal(s, forward) for s in stop_signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
