"""The commit protocol: a save that never finished is never loaded, and `latest` moves last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite.checkpoint import store


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
    assert meta["step"] == 10 and meta["files"]["mp_rank_00_model_states.pt"] == 110


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
