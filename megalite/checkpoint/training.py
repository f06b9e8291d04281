"""Save and load the whole training state through the DeepSpeed engine, atomically.

DeepSpeed writes model, optimizer (ZeRO-partitioned) and LR-scheduler state; megalite adds one
small file per rank (data-stream position and RNG states, which differ per rank) and the metadata
that `store.commit` seals. Every rank calls `save` and `load`; they are collective.

Checksums are computed in parallel: once every rank's files are written, rank r fsyncs and hashes
the files with index ≡ r (mod world size) of the sorted names, and rank 0 gathers the results
into meta.json. Loading splits the verification the same way, before DeepSpeed reads anything.

A failed write (a full disk, a file-size limit, a read-only or unwritable folder) never raises on
one rank alone, which would leave the others waiting in a collective: every rank records its
failure, the ranks agree at the next collective, and all raise the same one-line CheckpointError;
the partial folder is removed and the previous checkpoint stays `latest`.

`save_async` blocks only while DeepSpeed gathers the state and it is copied to host memory; a
background thread per rank then writes and fsyncs the files, hashes its own, and the threads
commit together over a process group of their own (the training loop's collectives go on
meanwhile); the same commit rules hold. The caller waits for one save before starting the next.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from megalite import faults
from megalite.checkpoint import store
from megalite.checkpoint.background import CapturedWrites, HostStaging, PendingSave
from megalite.parallel import deepspeed_compat

log = logging.getLogger("megalite")


class _RecordsFailure(Protocol):  # a stand-in checkpoint engine (`_swapped_checkpoint_engine`)
    failure: str | None


W = TypeVar("W", bound=_RecordsFailure)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any,
    *,
    root: Path,
    step: int,
    global_rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write a checkpoint of `step` under `root` and commit it, then prune to the newest `keep`
    (0: keep all); returns the committed folder. Raises CheckpointError on every rank, the
    previous checkpoint kept, if any rank cannot write (see the module docstring)."""
    tmp = _begin(root, step, global_rank=global_rank)
    failure = _write_files(engine, tmp, global_rank=global_rank, rank_state=rank_state)
    faults.point("after_rank_files", step=step)
    # Agreeing is also the barrier: every rank's files are on disk before any is hashed.
    _fail_if(_agree(failure), tmp, global_rank=global_rank)
    files, failure = _hash_shares(tmp, global_rank=global_rank)
    return _commit(root, step, meta, files, failure, global_rank=global_rank, keep=keep)


def save_async(
    engine: Any,
    *,
    root: Path,
    step: int,
    global_rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 0,
    group: dist.ProcessGroup,
    staging: HostStaging,
) -> PendingSave:
    """`save`, returning once the state is copied to host memory (into `staging`, which the
    caller keeps from save to save and does not reuse before `wait()`): the rest runs in a
    background thread whose collectives use `group` (every rank's, created for it). `wait()` on
    the result returns the committed folder or raises the CheckpointError `save` would have."""
    tmp = _begin(root, step, global_rank=global_rank)
    staging.begin()
    stand_in = functools.partial(CapturedWrites, staging=staging)
    with _swapped_checkpoint_engine(engine, stand_in) as captured:
        failure = _attempt(
            engine.save_checkpoint, str(tmp.parent), tag=tmp.name, save_latest=False, writing=tmp
        )
    captured.save({**rank_state, "rng": rng_state()}, tmp / store.rank_file(global_rank))
    staging.end()
    failure = failure or captured.failure
    write = functools.partial(_write_and_commit, root=root, step=step, meta=meta,
                              global_rank=global_rank, keep=keep, group=group,
                              zipfile=_zipfile(engine.checkpoint_engine))  # fmt: skip
    return PendingSave(write, captured.files, failure)


def _write_and_commit(
    files: list[tuple[Path, Any]],
    failure: str | None,
    *,
    root: Path,
    step: int,
    meta: dict[str, Any],
    global_rank: int,
    keep: int,
    group: dist.ProcessGroup,
    zipfile: bool,
) -> Path:
    """The background part of `save_async`: write this rank's files, fsync and hash them, commit."""
    tmp = root / store.tmp_name(step)
    for path, state in files:
        failure = failure or _attempt(_torch_save, state, path, zipfile=zipfile, writing=path)
    faults.point("after_rank_files", step=step)
    mine = [str(path.relative_to(tmp)) for path, _ in files]  # each rank hashes what it wrote
    every, failure = _hash_all(tmp, mine, failure=failure, group=group)
    return _commit(root, step, meta, every, failure, global_rank=global_rank, keep=keep,
                   group=group)  # fmt: skip


def _begin(root: Path, step: int, *, global_rank: int) -> Path:
    """Rank 0 prepares the checkpoint's temporary folder (all ranks agree it could); returns it."""
    tmp = root / store.tmp_name(step)
    prepared = _attempt(_prepare, root, tmp, writing=tmp) if global_rank == 0 else None
    _fail_if(_agree(prepared), tmp, global_rank=global_rank)
    return tmp


def _commit(
    root: Path,
    step: int,
    meta: dict[str, Any],
    files: dict[str, Any],
    failure: str | None,
    *,
    global_rank: int,
    keep: int,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Rank 0 seals the checkpoint (store.commit) with every rank's file entries, unless a rank
    failed (`failure`, the same on every rank); prunes to `keep`. Collective over `group` (all
    ranks; None: the default group)."""
    tmp = root / store.tmp_name(step)
    _fail_if(failure, tmp, global_rank=global_rank)
    outcome: list[Path | str | None] = [None]
    if global_rank == 0:
        try:
            outcome = [store.commit(root, step, meta, files=files)]
        except OSError as e:
            outcome = [_failure(e, "commit")]
    dist.broadcast_object_list(outcome, src=0, group=group)
    final = outcome[0]
    _fail_if(final if isinstance(final, str) else None, tmp, global_rank=global_rank)
    if global_rank == 0 and keep:
        _prune(root, keep)
    assert isinstance(final, Path)
    return final


def _prepare(root: Path, tmp: Path) -> None:
    """Rank 0, first: the checkpoint folder exists and is writable, no partial save is left."""
    root.mkdir(parents=True, exist_ok=True)
    store.discard_partial(root)
    tmp.mkdir()


def _write_files(
    engine: Any, tmp: Path, *, global_rank: int, rank_state: dict[str, Any]
) -> str | None:
    """This rank's files: DeepSpeed's, then its own state. Returns the first failure (None if
    none) instead of raising, after taking part in all of DeepSpeed's collectives."""
    with _swapped_checkpoint_engine(engine, _DeferredWrites) as writes:
        failure = _attempt(
            engine.save_checkpoint, str(tmp.parent), tag=tmp.name, save_latest=False, writing=tmp
        )
    if failure or writes.failure:
        return failure or writes.failure
    state = {**rank_state, "rng": rng_state()}
    path = tmp / store.rank_file(global_rank)
    return _attempt(_torch_save, state, path, writing=path)


def _zipfile(checkpoint_engine: Any) -> bool:
    """Whether DeepSpeed's checkpoint engine writes torch's zipfile format (its default)."""
    return getattr(checkpoint_engine, "zipfile_serialization", True)


def _torch_save(obj: Any, path: Path, *, zipfile: bool = True) -> None:
    """torch.save through a Python file, so that a failed write surfaces as the OSError (torch's
    own file writer reports only "file write failed")."""
    with open(path, "wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=zipfile)


class _DeferredWrites:
    """Stands in for the engine's checkpoint engine during a save: writes each file through a
    Python file and, once a write fails, records the failure and skips this rank's remaining
    writes instead of raising, so the rank stays in step with DeepSpeed's collectives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failure: str | None = None

    def save(self, state_dict: Any, path: str) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        if self.failure is not None:
            return
        if isinstance(self.inner, TorchCheckpointEngine):
            zipfile = _zipfile(self.inner)
            self.failure = _attempt(
                _torch_save, state_dict, Path(path), zipfile=zipfile, writing=path
            )
        else:
            self.failure = _attempt(self.inner.save, state_dict, path, writing=path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def _swapped_checkpoint_engine(engine: Any, stand_in: Callable[[Any], W]) -> Iterator[W]:
    """The engine's checkpoint engine replaced by `stand_in(it)` for the duration. DeepSpeed's
    copy of its recovery scripts (zero_to_fp32.py, by rank 0 only) records a failure in the
    stand-in's `failure` instead of raising on rank 0 alone."""
    inner = engine.checkpoint_engine
    copy_scripts = deepspeed_compat.recovery_script_copier(engine)
    engine.checkpoint_engine = writes = stand_in(inner)

    def copy_or_record(save_path: str) -> None:
        writes.failure = writes.failure or _attempt(copy_scripts, save_path, writing=save_path)

    deepspeed_compat.replace_recovery_script_copier(engine, copy_or_record)
    try:
        yield writes
    finally:
        engine.checkpoint_engine = inner
        deepspeed_compat.replace_recovery_script_copier(engine, None)


def _hash_shares(tmp: Path, *, global_rank: int) -> tuple[dict[str, Any], str | None]:
    """Each rank fsyncs and checksums its share of the files (index ≡ rank mod world size);
    returns every rank's entries together (what rank 0 commits) and the first failure."""
    share = store.list_files(tmp)[global_rank :: dist.get_world_size()]
    return _hash_all(tmp, share, failure=None, group=None)


def _hash_all(
    tmp: Path, rels: list[str], *, failure: str | None, group: dist.ProcessGroup | None
) -> tuple[dict[str, Any], str | None]:
    """This rank fsyncs and checksums `rels` (files under `tmp`) unless it already failed;
    returns every rank's entries together and the first failure, the same on every rank
    (collective over `group`)."""
    mine: dict[str, Any] = {}
    for rel in [] if failure else rels:
        try:
            mine[rel] = store.file_entry(tmp / rel, fsync=True)
        except OSError as e:
            failure = _failure(e, f"hashing {rel}")
            break
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (mine, failure), group=group)
    files = {rel: entry for entries, _ in gathered for rel, entry in entries.items()}
    return files, next((f for _, f in gathered if f), None)


def _attempt(fn: Callable[..., Any], *args: Any, writing: Path | str, **kwargs: Any) -> str | None:
    """Run `fn`; if it raised, the reason as one line (a failure for the ranks to agree on). Any
    exception counts: torch reports a failed write as a RuntimeError over the OSError."""
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return _failure(e, f"writing {Path(writing).name}")
    return None


def _failure(exc: Exception, doing: str) -> str:
    """E.g. "File too large [EFBIG] writing mp_rank_00_model_states.pt on rank 0"."""
    log.warning("checkpoint: %s failed: %s", doing, exc, exc_info=True)  # traceback in the log
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno:
        reason = f"{cause.strerror} [{errno.errorcode.get(cause.errno, cause.errno)}]"
        name = Path(cause.filename).name if cause.filename else ""
        doing += f" ({name})" if name and name not in doing else ""
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{reason} {doing} on rank {dist.get_rank()}"


def _agree(failure: str | None) -> str | None:
    """Every rank's failure (or None), gathered; the first in rank order, the same on all."""
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failure)
    return next((f for f in gathered if f), None)


def _fail_if(failure: str | None, tmp: Path, *, global_rank: int) -> None:
    """Raise the agreed failure as CheckpointError (rank 0 first removes the partial folder)."""
    if failure is None:
        return
    if global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = store.latest(tmp.parent)
    kept = f"the previous checkpoint {previous} is kept" if previous else "there is no earlier one"
    name = tmp.name.removeprefix(store.TMP_PREFIX)
    raise store.CheckpointError(f"cannot save checkpoint {name}: {failure}; {kept}")


def _prune(root: Path, keep: int) -> None:
    """Prune after a commit; a failure leaves old checkpoints behind, never stops training."""
    try:
        pruned = store.prune(root, keep=keep)
    except OSError as e:
        log.warning("pruning old checkpoints in %s failed: %s; they are left in place", root, e)
        return
    if pruned:
        log.info("pruned %s (trainer.keep_checkpoints=%d)", ", ".join(pruned), keep)


def verify_shared(ckpt: Path) -> None:
    """Every rank checks sizes and CRC-32 of its share of `ckpt`'s files (index ≡ rank mod world
    size); all raise the same CheckpointError naming the first damaged file. Collective."""
    files = store.read_meta(ckpt)["files"]
    problem = store.first_problem(ckpt, files, part=dist.get_rank(), parts=dist.get_world_size())
    problem = _agree(problem)
    if problem is not None:
        raise store.CheckpointError(f"{ckpt}: {problem}")


def load(engine: Any, ckpt: Path, *, global_rank: int, verify: bool = True) -> dict[str, Any]:
    """Restore engine state from a committed checkpoint, verified first (`verify_shared`, unless
    the caller just did); returns this rank's own saved state."""
    if verify:
        verify_shared(ckpt)
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent),
        tag=ckpt.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise store.CheckpointError(f"{ckpt}: DeepSpeed found no model states to load")
    rank_state = torch.load(ckpt / store.rank_file(global_rank), weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return rank_state
