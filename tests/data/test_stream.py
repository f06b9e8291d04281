"""TokenStream: coverage per epoch across DP ranks, packing, order, exact resume, damaged data."""

from __future__ import annotations

import hashlib
import json
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

from megalite.data import stream as stream_module
from megalite.data.manifest import DataError, load_manifest, read_shard
from megalite.data.stream import TokenStream

LAYOUT: dict[str, Any] = {"seq_len": 15, "micro_batch_size": 2, "dp_rank": 0, "dp_size": 1}


def make(root: Path, split: str = "train", **overrides: Any) -> TokenStream:
    return TokenStream(root, split, **({**LAYOUT, "seed": 7} | overrides))


def take(stream: TokenStream, n: int) -> list[torch.Tensor]:
    return list(islice(stream, n))


def epoch_samples(stream: TokenStream, epoch: int) -> list[bytes]:
    """The rank's samples of one epoch, in stream order (each identified by its bytes)."""
    return [t.tobytes() for _, _, t in stream._epoch_samples(epoch, 0)]


def stored_samples(root: Path, split: str) -> list[bytes]:
    m = load_manifest(root)
    pairs = zip(m.shards(split), m.split(split).shards, strict=True)
    return [s.tobytes() for p, info in pairs for s in read_shard(p, info, dtype=m.dtype)]


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_sample_once_per_epoch_across_ranks(small_data: Path, split: str, dp_size: int):
    everything = Counter(stored_samples(small_data, split))
    for epoch in (0, 1):
        single = epoch_samples(make(small_data, split), epoch)
        ranks = [make(small_data, split, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        per_rank = [epoch_samples(s, epoch) for s in ranks]
        assert Counter(single) == everything
        assert sum(per_rank, []) == single  # contiguous ranges of one global order
        base, extra = divmod(len(single), dp_size)
        assert [len(p) for p in per_rank] == [base + (r < extra) for r in range(dp_size)]


def test_each_rank_opens_only_its_shards(small_data: Path, monkeypatch: pytest.MonkeyPatch):
    opened: list[Path] = []

    def spy(path: Path, info: Any, *, dtype: str) -> list[np.ndarray]:
        opened.append(path)
        return read_shard(path, info, dtype=dtype)

    monkeypatch.setattr(stream_module, "read_shard", spy)
    n_shards = len(load_manifest(small_data).shards("train"))
    per_rank = []
    for rank in range(3):
        opened.clear()
        epoch_samples(make(small_data, dp_rank=rank, dp_size=3), 0)
        per_rank.append(len(opened))
        assert len(set(opened)) == len(opened)  # each shard read once per epoch
    assert sum(per_rank) <= n_shards + 2 and max(per_rank) < n_shards / 2


def test_fewer_shards_than_ranks(one_shard_data: Path) -> None:
    assert len(load_manifest(one_shard_data).shards("train")) == 1
    ranks = [make(one_shard_data, dp_rank=r, dp_size=2) for r in range(2)]
    seen = epoch_samples(ranks[0], 0) + epoch_samples(ranks[1], 0)
    assert Counter(seen) == Counter(stored_samples(one_shard_data, "train"))
    assert all(take(s, 3)[2].shape == (2, 16) for s in ranks)


def test_fewer_samples_than_ranks_raises(one_shard_data: Path) -> None:
    n = load_manifest(one_shard_data).samples("train")
    with pytest.raises(DataError, match=f"has {n} samples, fewer than dp_size={n + 1}"):
        make(one_shard_data, dp_size=n + 1)


@pytest.mark.parametrize("dp_size", [1, 3])
def test_windows_pack_the_rank_token_stream(small_data: Path, dp_size: int) -> None:
    layout = {"seq_len": 40, "micro_batch_size": 3, "dp_rank": dp_size - 1, "dp_size": dp_size}
    reference = make(small_data, **layout)
    samples = [b for epoch in range(3) for b in epoch_samples(reference, epoch)]
    tokens = np.frombuffer(b"".join(samples), dtype=np.uint16).astype(np.int64)  # 3 epochs
    n = len(tokens) // (3 * 41)
    stream = make(small_data, **layout)
    batches = take(stream, n)
    assert all(b.shape == (3, 41) and b.dtype == torch.int64 for b in batches)
    assert np.array_equal(torch.cat(batches).flatten().numpy(), tokens[: n * 3 * 41])
    assert stream.epoch == 2  # windows ran on across two epoch boundaries


def test_order_changes_with_epoch_and_seed_and_repeats_for_a_seed(small_data: Path) -> None:
    stream = make(small_data)
    assert epoch_samples(stream, 0) != epoch_samples(stream, 1)
    assert epoch_samples(make(small_data, seed=8), 0) != epoch_samples(stream, 0)
    a, b = take(make(small_data), 50), take(make(small_data), 50)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ordered = make(small_data, shuffle=False)
    assert epoch_samples(ordered, 0) == epoch_samples(ordered, 1)
    assert epoch_samples(ordered, 0) == stored_samples(small_data, "train")


def _batches_per_epoch(root: Path) -> int:
    """Batches of rank 1 of 2 in its first epoch, for resuming around the epoch boundary."""
    tokens = sum(len(b) // 2 for b in epoch_samples(make(root, dp_rank=1, dp_size=2), 0))
    return tokens // (LAYOUT["micro_batch_size"] * (LAYOUT["seq_len"] + 1))


@pytest.mark.parametrize("where", [0, 1, 37, "boundary-3", "boundary", "boundary+1", "2nd-epoch"])
def test_exact_resume(small_data: Path, where: int | str) -> None:
    per_epoch = _batches_per_epoch(small_data)
    offsets = {"boundary-3": -3, "boundary": 0, "boundary+1": 1, "2nd-epoch": per_epoch // 2}
    k = where if isinstance(where, int) else per_epoch + offsets[where]
    m = 12
    rank = {"dp_rank": 1, "dp_size": 2}
    expected = take(make(small_data, **rank), k + m)

    first = make(small_data, **rank)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = make(small_data, **rank)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.epoch == first.epoch
    for got in (take(resumed, m), take(first, m)):  # a new iter() also continues where it was
        assert all(torch.equal(x, y) for x, y in zip(got, expected[k:], strict=True))
    if where in ("boundary+1", "2nd-epoch"):
        assert state["epoch"] == 1


def test_resume_with_another_micro_batch_size_continues_the_tokens(small_data: Path) -> None:
    first = make(small_data)
    take(first, 5)
    resumed = make(small_data, micro_batch_size=1)
    resumed.load_state_dict(first.state_dict())
    expected = torch.cat(take(first, 4)).flatten()
    assert torch.equal(torch.cat(take(resumed, 8)).flatten(), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dp_size": 3}, "saved with dp_size=2, this stream has dp_size=3"),
        ({"dp_rank": 0}, "saved with dp_rank=1"),
        ({"seq_len": 16}, "saved with seq_len=15"),
        ({"seed": 8}, "saved with seed=7"),
    ],
)
def test_mismatched_state_raises(small_data: Path, change: dict[str, int], message: str) -> None:
    saved = make(small_data, dp_rank=1, dp_size=2)
    take(saved, 3)
    other = make(small_data, **({"dp_rank": 1, "dp_size": 2} | change))
    with pytest.raises(DataError, match=message):
        other.load_state_dict(saved.state_dict())


def test_state_from_other_data_raises(small_data: Path, one_shard_data: Path) -> None:
    with pytest.raises(DataError, match="other prepared data"):
        make(one_shard_data).load_state_dict(make(small_data).state_dict())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_shard_raises_naming_it(tmp_path: Path, small_data: Path, damage: str) -> None:
    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    victim = load_manifest(root).shards("train")[2]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_bytes(data[:600] + b"\xde\xad\xbe\xef" * 100 + data[1000:])
    with pytest.raises(DataError, match=re.escape(str(victim))):
        take(make(root, shuffle=False), 10_000)


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
