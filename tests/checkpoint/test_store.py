"""The commit protocol: a save that never finished is never loaded, and `latest` moves last."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from megalite.checkpoint import cli, store


def fake_save(root: Path, step: int, *, commit: bool) -> Path:
    tmp = root / store.tmp_name(step)
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    (tmp / store.rank_file(0)).write_bytes(b"y" * 10)
    if commit:
        return store.commit(root, step, {"model": {}, "layout": {}})
    return tmp


def test_commit_then_latest(tmp_path: Path) -> None:
    first = fake_save(tmp_path, 10, commit=True)
    assert store.latest(tmp_path) == first == tmp_path / "step_00000010"
    meta = json.loads((first / store.META).read_text())
    assert meta["step"] == 10 and meta["previous"] is None
    entry = meta["files"]["mp_rank_00_model_states.pt"]
    assert entry == {"size": 110, "crc32": f"{zlib.crc32(b'x' * 110):08x}"}
    second = fake_save(tmp_path, 20, commit=True)
    assert json.loads((second / store.META).read_text())["previous"] == first.name


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    first = fake_save(tmp_path, 10, commit=True)
    fake_save(tmp_path, 20, commit=False)  # a crash before commit
    assert store.latest(tmp_path) == first
    assert store.resolve("auto", run_dir=tmp_path.parent) is None  # not a run dir's checkpoints/
    assert store.resolve(str(tmp_path), run_dir=tmp_path) == first
    store.discard_partial(tmp_path)
    assert not (tmp_path / store.tmp_name(20)).exists() and first.exists()


def test_damaged_file_is_named(tmp_path: Path) -> None:
    ckpt = fake_save(tmp_path, 5, commit=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"short")
    with pytest.raises(store.CheckpointError, match="mp_rank_00_model_states.pt has 5 bytes"):
        store.read_meta(ckpt)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 105)
    (ckpt / store.rank_file(0)).unlink()
    with pytest.raises(store.CheckpointError, match="missing file rank_00000.pt"):
        store.read_meta(ckpt)


def test_uncommitted_folder_is_refused(tmp_path: Path) -> None:
    tmp = fake_save(tmp_path, 7, commit=False)
    with pytest.raises(store.CheckpointError, match="not a committed checkpoint"):
        store.resolve(str(tmp), run_dir=tmp_path)


def test_recommit_of_a_step_keeps_the_first(tmp_path: Path) -> None:
    first = fake_save(tmp_path, 10, commit=True)
    again = fake_save(tmp_path, 10, commit=True)
    assert again.name == "step_00000010.1" and first.exists()
    assert store.latest(tmp_path) == again


def test_flipped_bytes_are_named_by_verify_not_by_read_meta(tmp_path: Path) -> None:
    ckpt = fake_save(tmp_path, 5, commit=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50 + b"z" + b"x" * 54)  # same size
    store.read_meta(ckpt)  # the cheap check sees nothing
    with pytest.raises(store.CheckpointError, match="mp_rank_00_model_states.pt is damaged"):
        store.verify(ckpt)
    files = json.loads((ckpt / store.META).read_text())["files"]
    assert store.first_problem(ckpt, files, part=1, parts=2) is None  # the other rank's share
    assert "is damaged" in store.first_problem(ckpt, files, part=0, parts=2)


def test_sizes_only_meta_still_loads(tmp_path: Path) -> None:
    """Checkpoints saved before checksums record one int per file."""
    ckpt = fake_save(tmp_path, 5, commit=True)
    meta = json.loads((ckpt / store.META).read_text())
    meta["files"] = {rel: entry["size"] for rel, entry in meta["files"].items()}
    (ckpt / store.META).write_text(json.dumps(meta))
    assert store.verify(ckpt)["files"]["mp_rank_00_model_states.pt"] == 105
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"short")
    with pytest.raises(store.CheckpointError, match="has 5 bytes, 105 were saved"):
        store.verify(ckpt)


def test_crash_between_rename_and_latest_resolves_to_the_newer(tmp_path: Path) -> None:
    first = fake_save(tmp_path, 10, commit=True)
    second = fake_save(tmp_path, 20, commit=True)
    (tmp_path / store.LATEST).write_text(first.name + "\n")  # as if the pointer never moved
    assert store.latest(tmp_path) == second
    (tmp_path / store.LATEST).unlink()  # a crash before the very first pointer
    assert store.latest(tmp_path) == second


def test_rollback_wins_over_abandoned_newer_steps(tmp_path: Path) -> None:
    """A run resumed from step 10 after step 30 was saved: its step 20 names step 30 as
    `previous` and stays the newest, whatever the step numbers."""
    for step in (10, 20, 30):
        fake_save(tmp_path, step, commit=True)
    again = fake_save(tmp_path, 20, commit=True)
    assert again.name == "step_00000020.1" and store.latest(tmp_path) == again


def test_prune_keeps_newest_and_latest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        fake_save(tmp_path, step, commit=True)
    (tmp_path / ".trash-step_00000005").mkdir()  # left by a crash during pruning
    assert store.prune(tmp_path, keep=0) == []
    assert store.prune(tmp_path, keep=2) == ["step_00000010", "step_00000020"]
    assert [p.name for p in store.committed(tmp_path)] == ["step_00000030", "step_00000040"]
    rollback = fake_save(tmp_path, 20, commit=True)  # newest, though not the highest step
    assert store.prune(tmp_path, keep=1) == ["step_00000030"]
    assert [p.name for p in store.committed(tmp_path)] == [rollback.name, "step_00000040"]
    assert store.latest(tmp_path) == rollback
    store.discard_partial(tmp_path)
    assert not list(tmp_path.glob(".trash-*"))


def test_convert_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = fake_save(tmp_path, 5, commit=True)
    assert cli.main(["verify", str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {ckpt}: 2 files")
    (ckpt / store.rank_file(0)).write_bytes(b"z" * 10)
    assert cli.main(["verify", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megalite-convert: error: {ckpt}: file rank_00000.pt is damaged: CRC-32 " + (
        f"{zlib.crc32(b'z' * 10):08x}, {zlib.crc32(b'y' * 10):08x} at save"
    )


def test_resume_candidates_skip_damaged_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Newest commit first; a checkpoint whose meta.json cannot be read, or whose file is short,
    is left out (logged), and the chain goes on past it by step."""
    first, second, third = (fake_save(tmp_path, step, commit=True) for step in (10, 20, 30))
    assert store.lineage(tmp_path) == [third, second, first]
    (third / store.META).write_text("{not json")
    (second / "mp_rank_00_model_states.pt").write_bytes(b"short")
    assert store.lineage(tmp_path) == [third, second, first]
    assert store.resume_candidates(tmp_path) == [first]
    assert f"skipping damaged checkpoint {third}: meta.json cannot be read" in caplog.text
    assert f"skipping damaged checkpoint {second}: file mp_rank_00_model_states.pt" in caplog.text
