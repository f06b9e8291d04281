"""Resumable preparation: interrupted anywhere in the second pass (an exception in-process, or
kill -9 of the CLI), a re-run finishes byte-identical to an uninterrupted run without rewriting
the shards the journal lists; changed options start afresh."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megalite.data.cli import main
from megalite.data.resume import WORK_DIR, WorkFolder
from tests.data.datagen import make_texts
from tests.data.helpers import folder_files, write_jsonl

REPO = Path(__file__).resolve().parents[2]
OPTIONS = [
    "--vocab-size", "300", "--val-fraction", "0.2", "--sample-tokens", "16",
    "--shard-tokens", "64", "--dedup", "minhash",
]  # fmt: skip


class Interrupt(BaseException):
    """Stands for a kill: nothing in the code under test catches it."""


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = make_texts(150, seed=5)
    return write_jsonl(tmp_path_factory.mktemp("src") / "in.jsonl", [{"text": t} for t in texts])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, src: Path) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs, with and without a --max-tokens cap."""
    out = {}
    for name, extra in (("plain", []), ("capped", ["--max-tokens", "2500"])):
        folder = tmp_path_factory.mktemp(name)
        assert main(["--input", str(src), "--output", str(folder), *OPTIONS, *extra]) == 0
        out[name] = folder_files(folder)
    return out


def interrupt_after(monkeypatch: pytest.MonkeyPatch, saves: int, *, before_save: bool) -> None:
    """Raise `Interrupt` at the `saves`-th journal write: just before it (the shard is written but
    not journaled) or just after it."""
    original = WorkFolder.save_journal
    calls = 0

    def save(self: WorkFolder, journal: object) -> None:
        nonlocal calls
        calls += 1
        if calls == saves and before_save:
            raise Interrupt
        original(self, journal)  # type: ignore[arg-type]
        if calls == saves:
            raise Interrupt

    monkeypatch.setattr(WorkFolder, "save_journal", save)


def listed_shards(out: Path) -> dict[str, tuple[int, int]]:
    """The journal's shards → (inode, mtime_ns): a rewritten shard gets a new inode."""
    journal = json.loads((out / WORK_DIR / "journal.json").read_text())
    paths = [s["path"] for p in journal["splits"].values() for s in p["shards"]]
    return {p: ((out / p).stat().st_ino, (out / p).stat().st_mtime_ns) for p in paths}


@pytest.mark.parametrize(
    ("saves", "before_save", "cap"),
    [(1, False, False), (7, True, False), (12, False, False), (5, False, True), (9, True, True)],
)
def test_resume_after_an_interruption(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    src: Path,
    reference: dict[str, dict[str, bytes]],
    saves: int,
    before_save: bool,
    cap: bool,
) -> None:
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), *OPTIONS]
    args += ["--max-tokens", "2500"] if cap else []
    with monkeypatch.context() as patch:
        interrupt_after(patch, saves, before_save=before_save)
        with pytest.raises(Interrupt):
            main(args)
    assert not (out / "manifest.json").exists()
    kept = listed_shards(out)
    assert len(kept) == saves - before_save

    def no_first_pass(*_: object, **__: object) -> None:
        raise AssertionError("the first pass ran again")

    monkeypatch.setattr(sys.modules["megalite.data.prepare"], "_first_pass", no_first_pass)
    assert main(args) == 0
    assert folder_files(out) == reference["capped" if cap else "plain"]
    assert not (out / WORK_DIR).exists()
    for path, stat in kept.items():
        assert ((out / path).stat().st_ino, (out / path).stat().st_mtime_ns) == stat, path


def test_kill_9_then_resume(tmp_path: Path, src: Path, reference: dict) -> None:
    """The CLI with 2 workers killed after its 6th journal write; resumed with 1 worker."""
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), *OPTIONS]
    script = (
        "import multiprocessing, os, signal, sys\n"
        "from megalite.data.cli import main\n"
        "from megalite.data.resume import WorkFolder\n"
        "save, calls = WorkFolder.save_journal, []\n"
        "def killing_save(self, journal):\n"
        "    save(self, journal)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 6:\n"
        "        print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "WorkFolder.save_journal = killing_save\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), *args, "--workers", "2"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,  # also what a worker outliving its killed parent (holding stdout) costs
    )
    assert proc.returncode == -9, proc.stderr
    workers = [int(pid) for pid in proc.stdout.split()]
    assert len(workers) == 2
    kept = listed_shards(out)
    assert len(kept) == 6
    assert main(args) == 0
    assert folder_files(out) == reference["plain"]
    assert all(
        ((out / p).stat().st_ino, (out / p).stat().st_mtime_ns) == s for p, s in kept.items()
    )
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)  # the orphaned workers notice their parent is gone and exit
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_changed_options_start_afresh(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    src: Path,
    reference: dict,
) -> None:
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), *OPTIONS]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 4, before_save=False)
        with pytest.raises(Interrupt):
            main([*args, "--seed", "1"])
    first_shard = (out / "train" / "shard-000000.tar").stat().st_ino
    with caplog.at_level(logging.INFO, logger="megalite.data"):
        assert main(args) == 0  # --seed back to 0: another fingerprint
    assert "options or inputs changed since the interrupted run: starting afresh" in caplog.text
    assert folder_files(out) == reference["plain"]
    assert (out / "train" / "shard-000000.tar").stat().st_ino != first_shard

    with monkeypatch.context() as patch:  # a changed input file starts afresh too
        interrupt_after(patch, 2, before_save=False)
        with pytest.raises(Interrupt):
            main(args)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megalite.data"):
        assert main(args) == 0
    assert "starting afresh" in caplog.text
    assert folder_files(out) == reference["plain"]
