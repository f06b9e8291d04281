"""Faults during checkpointing, injected for real: a rank SIGKILLed at each point of a save
(MEGALITE_FAULT, see megalite/checkpoint/faults.py), a damaged file, pruning, a full disk (a file
size limit, RLIMIT_FSIZE) and an unwritable folder. Each leaves the previous checkpoint `latest`
and loadable, and a run resumed with `trainer.resume=auto` ends with an uninterrupted run's losses.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from megalite import faults
from megalite.checkpoint import store, training
from megalite.launch import launch
from tests.helpers import ROOT, short_job, short_job_overrides, train_losses

STEPS = 8
JOB = ("parallel.dp=2", "parallel.zero_stage=1", "trainer.save_interval=2")


def train(data: Path, run_dir: Path, *extra: str) -> None:
    launch(short_job(data, run_dir, *JOB, *extra, steps=STEPS), default_run_dir=run_dir)


def step(n: int) -> str:
    return store.step_name(n)


@pytest.fixture(scope="module")
def reference(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of an uninterrupted run that keeps its 2 newest checkpoints."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(sample_data, run_dir, "trainer.keep_checkpoints=2")
    return run_dir


# Each run resumes the previous one (trainer.resume=auto) and is killed at the next point; then
# `latest()` must name this step. Before the rename the new checkpoint does not exist; after it,
# it is whole and committed, and wins over the `latest` file that still names the previous one.
# Runs marked async save with trainer.async_save=true: the kill comes in rank 0's background
# commit while its training loop is already on the next steps.
KILLS = [
    ("after_rank_files@step=4,rank=1", 2, False),  # rank 0 is left waiting; the launcher ends it
    ("before_rename@step=4", 2, True),
    ("during_prune@step=4", 4, False),  # step 2 half-deleted as .trash-step_00000002
    ("after_rename_before_latest@step=6", 6, True),
]
ASYNC = "trainer.async_save=true"


def test_kill_at_each_point_of_a_save_then_resume_ends_as_uninterrupted(
    sample_data: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run killed at each fault point in turn (a chain: each run resumes the one before,
    which costs half the runs of one kill and one resume per point), then one that finishes,
    saving asynchronously, with the synchronous uninterrupted run's losses."""
    assert sorted(spec.split("@")[0] for spec, _, _ in KILLS) == sorted(faults.SAVE_POINTS)
    ckpts = tmp_path / "checkpoints"
    resume = ["trainer.keep_checkpoints=1", "trainer.resume=auto"]
    for spec, latest_step, background in KILLS:
        monkeypatch.setenv(faults.ENV, spec)
        with pytest.raises(Exception, match="SIGKILL"):
            train(sample_data, tmp_path, *resume, *([ASYNC] if background else []))
        assert store.latest(ckpts) == ckpts / step(latest_step), spec
        store.verify(ckpts / step(latest_step))
    monkeypatch.delenv(faults.ENV)
    train(sample_data, tmp_path, *resume, ASYNC)
    log = (tmp_path / "logs" / "rank_00000.log").read_text()
    assert log.count("resumed from") == len(KILLS)
    assert f"resumed from {ckpts / step(6)} at step 6" in log
    assert "checkpoint step 8 copied to host memory" in log
    assert train_losses(tmp_path) == train_losses(reference)  # each run's steps, the last wins
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [step(STEPS)]  # no debris


def flip_bytes(path: Path) -> None:
    """Damage `path` in the middle, keeping its size (the size check cannot see it)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def test_damaged_file_is_named_on_resume(
    sample_data: Path, reference: Path, tmp_path: Path
) -> None:
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    ckpt = store.latest(tmp_path / "checkpoints")
    damaged = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # 4th of 5 sorted: rank 1 checks it
    flip_bytes(ckpt / damaged)
    store.read_meta(ckpt)  # sizes match: the launcher's cheap check passes
    one_line = rf"CheckpointError: {re.escape(str(ckpt))}: file {damaged} is damaged: "
    with pytest.raises(Exception, match=one_line + r"CRC-32 \w{8}, \w{8} at save\n"):
        train(sample_data, tmp_path, f"trainer.resume={ckpt}")  # auto would take step 6


def test_keep_checkpoints_prunes_to_n(reference: Path) -> None:
    """Steps 2, 4, 6, 8 saved with keep_checkpoints=2. (That a kept one loads: the disk-full test
    below resumes from step 6; the chain of kills above prunes with keep_checkpoints=1.)"""
    ckpts = reference / "checkpoints"
    assert [p.name for p in store.committed(ckpts)] == [step(6), step(8)]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [step(6), step(8)]
    log = (reference / "logs" / "rank_00000.log").read_text()
    assert f"pruned {step(2)} (trainer.keep_checkpoints=2)" in log
    assert f"pruned {step(4)} (trainer.keep_checkpoints=2)" in log


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: files of this process and its children may not grow beyond `limit` bytes
    (a write past it fails with EFBIG instead of raising SIGXFSZ): a disk that fills up."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_fails_cleanly_and_keeps_the_previous(
    sample_data: Path, reference: Path, tmp_path: Path
) -> None:
    """The reference's kept step 6, its meta.json rewritten as megalite wrote it before checksums
    (sizes only), resumed under a 1 MiB file-size limit: logs and rank files fit, DeepSpeed's
    files do not. The run trains steps 7-8 as the reference did (the old checkpoint loads), then
    stops at the step 8 save with one line, and step 6 stays `latest`, byte for byte."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    kept = ckpts / step(6)
    shutil.copytree(reference / "checkpoints" / step(6), kept)
    meta = json.loads((kept / store.META).read_text())
    meta["files"] = {rel: entry["size"] for rel, entry in meta["files"].items()}
    del meta["previous"]
    (kept / store.META).write_text(json.dumps(meta))
    (ckpts / store.LATEST).write_text(step(6) + "\n")
    before = {rel: store.file_entry(kept / rel) for rel in store.list_files(kept)}
    args = short_job_overrides(sample_data, run_dir, *JOB, "trainer.resume=auto", steps=STEPS)
    out = subprocess.run(
        [sys.executable, "launch/pretrain.py", *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit(1 << 20),
    )
    assert out.returncode != 0, out.stdout[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.search(
        rf"cannot save checkpoint {step(8)}: File too large \[EFBIG\] writing \S+\.pt on rank \d; "
        rf"the previous checkpoint {re.escape(str(kept))} is kept$",
        last,
    ), last
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [step(6)]  # no .tmp- left
    assert store.latest(ckpts) == kept
    assert {rel: store.file_entry(kept / rel) for rel in store.list_files(kept)} == before
    assert train_losses(run_dir) == {s: v for s, v in train_losses(reference).items() if s > 6}


@pytest.fixture
def one_rank_world(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of this process alone."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwritable_checkpoint_folder_fails_cleanly(tmp_path: Path, one_rank_world: None) -> None:
    """Tests may run as root, for whom chmod forbids nothing, but /sys refuses new folders to
    everyone (EPERM as root, EACCES otherwise): the checkpoint folder is a link to it. The save
    fails before DeepSpeed is asked to write anything (no engine is needed)."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    root = tmp_path / "checkpoints"
    root.symlink_to("/sys")
    line = rf"cannot save checkpoint {step(2)}: .+ \[E(PERM|ACCES|ROFS)\] writing \.tmp-{step(2)}"
    with pytest.raises(store.CheckpointError, match=line + " on rank 0; there is no earlier one$"):
        training.save(None, root=root, step=2, global_rank=0, rank_state={}, meta={})
