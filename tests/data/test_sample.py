"""prepare_sample: the bundled tinyshakespeare, prepared once into a cache folder."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from megalite.data import sample as sample_module
from megalite.data.manifest import load_manifest
from megalite.data.sample import prepare_sample
from megalite.data.stream import TokenStream


def test_prepares_once_then_returns_at_once(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = prepare_sample(tmp_path / "cache")
    first = time.perf_counter() - start
    assert re.fullmatch(r"shakespeare-v4096-[0-9a-f]{12}", root.name)
    assert root.parent == tmp_path / "cache" and first < 20
    m = load_manifest(root)
    assert m.vocab_size == 4096 and m.dtype == "uint16"
    assert m.stats["documents_read"] > 7000 and m.samples("val") >= 8
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temp folder left

    start = time.perf_counter()
    assert prepare_sample(tmp_path / "cache") == root
    assert time.perf_counter() - start < 0.5

    val = TokenStream(root, "val", seq_len=64, micro_batch_size=2, dp_rank=1, dp_size=2, seed=0)
    batch = next(iter(val))
    assert batch.shape == (2, 65) and int(batch.max()) < m.vocab_size


def test_losing_the_rename_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process finishes first: its folder appears just before our rename."""
    real_rename = os.rename

    def rename_after_a_rival(src: str | Path, dst: str | Path) -> None:
        shutil.copytree(src, dst)  # the rival's complete copy
        real_rename(src, dst)  # now fails: dst exists and is not empty

    monkeypatch.setattr(sample_module.os, "rename", rename_after_a_rival)
    root = prepare_sample(tmp_path, vocab_size=512)
    assert root.name.startswith("shakespeare-v512-")
    assert load_manifest(root).vocab_size == 512
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # our temp folder is gone
