"""TokenStream: one global window stream whatever dp, exact resume (with another dp too), order,
shard reads, damaged data.

The reference stream is built here from the shards and `permutation` alone, so the tests check the
stream's contract, not its caches and offsets.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megalite.data import shards as shards_module
from megalite.data import source as source_module
from megalite.data.codec import read_shard
from megalite.data.errors import DataError
from megalite.data.manifest import load_manifest
from megalite.data.shards import Retry
from megalite.data.stream import TokenStream, permutation

SEED = 7
LAYOUT: dict[str, Any] = {"seq_len": 15, "micro_batch_size": 2, "dp_rank": 0, "dp_size": 1}
FAST_RETRY = Retry(attempts=2, delay_s=0.0)  # damaged shards fail fast


def make(root: Path, split: str = "train", **overrides: Any) -> TokenStream:
    return TokenStream(root, split, **({**LAYOUT, "seed": SEED, "retry": FAST_RETRY} | overrides))


def take(stream: TokenStream, n: int) -> list[torch.Tensor]:
    return list(islice(stream, n))


def ranks(root: Path, dp_size: int, split: str = "train", **overrides: Any) -> list[TokenStream]:
    return [make(root, split, dp_rank=r, dp_size=dp_size, **overrides) for r in range(dp_size)]


def rounds(streams: list[TokenStream], n: int) -> list[torch.Tensor]:
    """The next n DP rounds of a layout's ranks: each round is the ranks' micro-batches stacked
    rank-major, (dp_size * micro_batch_size, seq_len + 1)."""
    per_rank = [take(s, n) for s in streams]
    return [torch.cat(batches) for batches in zip(*per_rank, strict=True)]


def flat(batches: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(batches).flatten().numpy()


@functools.cache
def stored_samples(root: Path, split: str) -> list[np.ndarray]:
    m = load_manifest(root)
    pairs = zip(m.shards(split), m.split(split).shards, strict=True)
    return [s for p, info in pairs for s in read_shard(p, info, dtype=m.dtype)]


@functools.cache
def epoch_samples(root: Path, split: str, epoch: int, seed: int = SEED) -> list[np.ndarray]:
    """One epoch's samples in the documented order: shards by (seed, "shards", epoch), then each
    shard's samples by (seed, "samples", epoch, shard)."""
    m = load_manifest(root)
    infos, paths = m.split(split).shards, m.shards(split)
    out = []
    for shard in permutation(len(infos), seed, "shards", epoch):
        samples = read_shard(paths[shard], infos[shard], dtype=m.dtype)
        out += [samples[i] for i in permutation(len(samples), seed, "samples", epoch, int(shard))]
    return out


def global_tokens(root: Path, split: str, n_tokens: int) -> np.ndarray:
    """The first `n_tokens` of the global stream: epochs of `epoch_samples`, concatenated."""
    epochs = math.ceil(n_tokens / load_manifest(root).tokens(split))
    pieces = [s for e in range(epochs) for s in epoch_samples(root, split, e)]
    return np.concatenate(pieces).astype(np.int64)[:n_tokens]


def rounds_per_epoch(root: Path, dp_size: int, micro_batch_size: int) -> int:
    round_tokens = dp_size * micro_batch_size * (LAYOUT["seq_len"] + 1)
    return load_manifest(root).tokens("train") // round_tokens


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_together_read_the_global_stream_once(small_data: Path, split: str, dp_size: int):
    """Rank-major rounds are the consecutive windows of the global stream: each window's tokens
    are read once, by one rank, and every sample's tokens once per epoch."""
    everything = Counter(s.tobytes() for s in stored_samples(small_data, split))
    for epoch in (0, 1, 2):
        assert Counter(s.tobytes() for s in epoch_samples(small_data, split, epoch)) == everything
    streams = ranks(small_data, dp_size, split, seq_len=40, micro_batch_size=3)
    n = 2 * load_manifest(small_data).tokens(split) // (dp_size * 3 * 41) + 2  # > 2 epochs
    got = rounds(streams, n)
    assert all(r.shape == (dp_size * 3, 41) and r.dtype == torch.int64 for r in got)
    assert np.array_equal(flat(got), global_tokens(small_data, split, n * dp_size * 3 * 41))
    assert [s.epoch for s in streams] == [2] * dp_size  # the round ran into the third epoch


@pytest.mark.parametrize("seq_len", [15, 50])
def test_rounds_do_not_depend_on_dp(small_data: Path, seq_len: int) -> None:
    n = rounds_per_epoch(small_data, 1, 8) + 3  # across an epoch boundary
    single = take(make(small_data, seq_len=seq_len, micro_batch_size=8), n)
    for dp_size in (2, 4, 8):
        streams = ranks(small_data, dp_size, seq_len=seq_len, micro_batch_size=8 // dp_size)
        got = rounds(streams, n)
        assert all(torch.equal(a, b) for a, b in zip(got, single, strict=True))


def test_each_rank_opens_only_the_shards_its_windows_overlap(
    small_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    m = load_manifest(small_data)
    paths = [str(p) for p in m.shards("train")]

    def spy(url: str, info: Any, *, dtype: str, retry: Any) -> list[np.ndarray]:
        opened.append(paths.index(url))
        return read_shard(Path(url), info, dtype=dtype)

    monkeypatch.setattr(source_module, "read_shard_at", spy)
    order = permutation(len(paths), SEED, "shards", 0)
    bounds = np.cumsum([0] + [m.split("train").shards[s].tokens for s in order])
    block = 48 * 16  # a micro-batch: two full shards' worth of tokens
    n = m.tokens("train") // (3 * block)  # rounds within epoch 0
    for rank in range(3):
        opened.clear()
        take(make(small_data, micro_batch_size=48, dp_rank=rank, dp_size=3), n)
        starts = [(3 * k + rank) * block for k in range(n)]
        expected = [
            int(order[i])
            for start in starts
            for i in range(len(order))
            if bounds[i] < start + block and bounds[i + 1] > start
        ]
        assert opened == list(dict.fromkeys(expected))  # each needed shard read once, in order
        assert len(opened) < int(np.searchsorted(bounds, n * 3 * block)) * 0.6


def test_fewer_shards_than_ranks(one_shard_data: Path) -> None:
    assert len(load_manifest(one_shard_data).shards("train")) == 1
    streams = ranks(one_shard_data, 2)
    got = rounds(streams, 50)  # several epochs of a 1336-token split
    assert np.array_equal(flat(got), global_tokens(one_shard_data, "train", 50 * 2 * 2 * 16))


def test_split_shorter_than_a_window_raises(one_shard_data: Path) -> None:
    n = load_manifest(one_shard_data).tokens("train")
    make(one_shard_data, seq_len=n - 1)
    with pytest.raises(DataError, match=f"has {n} tokens, fewer than one window.* = {n + 1}"):
        make(one_shard_data, seq_len=n)


def test_order_changes_with_epoch_and_seed_and_repeats_for_a_seed(small_data: Path) -> None:
    per_epoch = rounds_per_epoch(small_data, 1, 2)
    a = flat(take(make(small_data), 2 * per_epoch))
    half = len(a) // 2
    assert not np.array_equal(a[:half], a[half:])  # epoch 0 and epoch 1 differ
    assert not np.array_equal(flat(take(make(small_data, seed=8), 2 * per_epoch)), a)
    assert np.array_equal(flat(take(make(small_data), 2 * per_epoch)), a)
    ordered = flat(take(make(small_data, shuffle=False), 2 * per_epoch))
    stored = np.concatenate(stored_samples(small_data, "train"))
    assert np.array_equal(ordered, np.tile(stored, 2)[: len(ordered)])


@pytest.mark.parametrize("where", [0, 1, 37, "boundary-3", "boundary", "boundary+1", "2nd-epoch"])
def test_exact_resume(small_data: Path, where: int | str) -> None:
    per_epoch = rounds_per_epoch(small_data, 2, LAYOUT["micro_batch_size"])
    offsets = {"boundary-3": -3, "boundary": 0, "boundary+1": 1, "2nd-epoch": per_epoch // 2}
    k = where if isinstance(where, int) else per_epoch + offsets[where]
    m = 12
    rank = {"dp_rank": 1, "dp_size": 2}
    expected = take(make(small_data, **rank), k + m)

    first = make(small_data, **rank)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    assert state["window"] == 4 * k
    resumed = make(small_data, **rank)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.epoch == first.epoch
    for got in (take(resumed, m), take(first, m)):  # a new iter() also continues where it was
        assert all(torch.equal(x, y) for x, y in zip(got, expected[k:], strict=True))
    if where in ("boundary+1", "2nd-epoch"):
        assert state["epoch"] == 1


@pytest.mark.parametrize("k", [0, 5, "boundary"])
def test_resume_with_another_dp_neither_repeats_nor_skips(small_data: Path, k: int | str) -> None:
    """dp=2 × mb=4 saves after k rounds; layouts with another dp (and micro-batch size, and so
    another number of rounds per step) continue with exactly the windows dp=2 would read next."""
    k = rounds_per_epoch(small_data, 2, 4) - 1 if k == "boundary" else int(k)
    m = 6
    expected = flat(rounds(ranks(small_data, 2, micro_batch_size=4), k + m)[k:])

    saver = ranks(small_data, 2, micro_batch_size=4)
    rounds(saver, k)
    states = [json.loads(json.dumps(s.state_dict())) for s in saver]
    assert states[0] == states[1] | {"dp_rank": 0} and states[0]["window"] == 8 * k
    for dp_size, mb, n in [(1, 8, m), (4, 2, m), (8, 1, m), (2, 2, 2 * m), (1, 4, 2 * m)]:
        resumed = ranks(small_data, dp_size, micro_batch_size=mb)
        for r, stream in enumerate(resumed):
            stream.load_state_dict(states[r % 2])  # any rank's state holds the position
        assert np.array_equal(flat(rounds(resumed, n)), expected), (dp_size, mb)


def test_misaligned_resume_raises(small_data: Path) -> None:
    saver = make(small_data, micro_batch_size=3)
    take(saver, 1)  # the next round starts at window 3
    for layout in ({"micro_batch_size": 2}, {"micro_batch_size": 1, "dp_size": 2}):
        with pytest.raises(DataError, match=r"window 3, which is not a whole number of rounds"):
            make(small_data, **layout).load_state_dict(saver.state_dict())
    fits = make(small_data, micro_batch_size=1, dp_size=3, dp_rank=2)
    fits.load_state_dict(saver.state_dict())
    assert torch.equal(take(fits, 1)[0], take(saver, 1)[0][2:])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq_len": 16}, "saved with seq_len=15, this stream has seq_len=16"),
        ({"seed": 8}, "saved with seed=7"),
        ({"shuffle": False}, "saved with shuffle=True"),
    ],
)
def test_mismatched_state_raises(small_data: Path, change: dict[str, Any], message: str) -> None:
    saved = make(small_data, dp_rank=1, dp_size=2)
    take(saved, 3)
    with pytest.raises(DataError, match=message):
        make(small_data, **change).load_state_dict(saved.state_dict())
    with pytest.raises(DataError, match="saved with split='train'"):
        make(small_data, "val").load_state_dict(saved.state_dict())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 1}, "state version 1 is not supported"),
        ({"window": -4}, "window=-4 is invalid"),
        ({"window": "4"}, "window='4' is invalid"),
    ],
)
def test_invalid_state_raises(small_data: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        make(small_data).load_state_dict(make(small_data).state_dict() | change)


def test_state_from_other_data_raises(small_data: Path, one_shard_data: Path) -> None:
    with pytest.raises(DataError, match="other prepared data"):
        make(one_shard_data).load_state_dict(make(small_data).state_dict())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_shard_raises_naming_it(
    tmp_path: Path,
    small_data: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local shard whose bytes differ from the manifest is damaged, not flaky: read once, no
    retry (no "retrying" warning), one error naming it with the manifest's and the found sha256."""
    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    manifest = load_manifest(root)
    victim, info = manifest.shards("train")[2], manifest.split("train").shards[2]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_bytes(data[:600] + b"\xde\xad\xbe\xef" * 100 + data[1000:])
    reads: Counter[str] = Counter()
    read_bytes = shards_module.read_bytes
    monkeypatch.setattr(
        shards_module, "read_bytes", lambda url, *a: reads.update([url]) or read_bytes(url, *a)
    )
    stream = make(root, shuffle=False, retry=Retry(attempts=3, delay_s=0.0))
    with pytest.raises(DataError, match=re.escape(str(victim))) as e:
        take(stream, 10_000)
    assert reads[str(victim)] == 1
    assert "attempt" not in str(e.value) and "retrying" not in caplog.text
    found = hashlib.sha256(victim.read_bytes()).hexdigest()
    assert str(e.value).startswith(f"shard {victim} is corrupt")
    assert found[:16] in str(e.value) and info.sha256[:16] in str(e.value)
    assert "restore the file or prepare the data again" in str(e.value)


@pytest.mark.parametrize("cut", ["half", "header", "garbage"])
def test_undecodable_shard_raises_naming_it(tmp_path: Path, small_data: Path, cut: str) -> None:
    """Damage the manifest's checksum cannot catch (sha256 updated): decoding must fail cleanly."""
    m = load_manifest(small_data)
    path, info = tmp_path / "shard.tar", m.split("train").shards[0]
    data = m.shards("train")[0].read_bytes()
    bad = {
        "half": data[: len(data) // 2],
        "header": data[:100] + b"\xff" * 400 + data[500:],
        "garbage": b"not a tar file " * 100,
    }[cut]
    path.write_bytes(bad)
    info = replace(info, sha256=hashlib.sha256(bad).hexdigest())
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_shard(path, info, dtype=m.dtype)


def test_load_manifest_errors(tmp_path: Path, small_data: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no prepared data.*tools/prepare_data.py --input"):
        load_manifest(tmp_path / "empty")

    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    (root / "train" / "shard-000004.tar").unlink()
    with pytest.raises(DataError, match=r"shard .*train/shard-000004.tar .* missing"):
        load_manifest(root)
    with pytest.raises(DataError, match="missing"):
        make(root)

    root = Path(shutil.copytree(small_data, tmp_path / "data2"))
    raw = json.loads((root / "manifest.json").read_text())
    raw["splits"]["val"]["shards"] = []
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="split 'val' .* has no shards"):
        load_manifest(root)
    with pytest.raises(DataError, match="no split 'test'"):
        make(small_data, "test")


def test_fast_tar_parser_agrees_with_tarfile(small_data: Path) -> None:
    from megalite.data import codec

    for path in load_manifest(small_data).shards("train")[:3]:
        data = path.read_bytes()
        assert codec._tar_members(data) == codec._tarfile_members(data)
