"""Manifest format 2 (shards checked by xxh3-64) next to format 1 (checked by sha256): the shards
are the same bytes, a format-1 folder streams the same tokens and keeps its manifest bytes (its
data id), and damage is caught in both."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds

from megalite.data.codec import hexdigest
from megalite.data.errors import DataError
from megalite.data.manifest import FORMAT_VERSION, MANIFEST_NAME, load_manifest, manifest_bytes
from megalite.data.shards import Retry, locate
from megalite.data.stream import TokenStream


def old_layout(new: Path, out: Path) -> Path:
    """`new` (format 2) rewritten as format 1 wrote it: the same shards, a manifest without
    xxh3-64 and with format_version 1, in format 1's canonical encoding."""
    root = Path(shutil.copytree(new, out))
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["format_version"] = 1
    for split in raw["splits"].values():
        for shard in split["shards"]:
            del shard["xxh3_64"]
    (root / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return root


def tokens(root: Path, n: int, **kw: Any) -> list[torch.Tensor]:
    args: dict[str, Any] = dict(seq_len=31, micro_batch_size=2, dp_rank=0, dp_size=1, seed=5)
    stream = TokenStream(str(root), "train", retry=Retry(attempts=1, delay_s=0.0), **(args | kw))
    return list(islice(stream, n))


def test_format_2_records_both_checksums(small_data: Path) -> None:
    m = load_manifest(small_data)
    assert m.format_version == FORMAT_VERSION == 2
    for path, info in zip(m.shards("train"), m.split("train").shards, strict=True):
        data = path.read_bytes()
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.checksum == ("xxh3_64", info.xxh3_64) == ("xxh3_64", hexdigest("xxh3_64", data))
    assert (small_data / MANIFEST_NAME).read_bytes() == manifest_bytes(m)


def test_old_layout_reads_identically(tmp_path: Path, small_data: Path) -> None:
    old = old_layout(small_data, tmp_path / "old")
    m = load_manifest(old)
    assert m.format_version == 1
    assert all(s.xxh3_64 is None and s.checksum[0] == "sha256" for s in m.split("train").shards)
    assert (old / MANIFEST_NAME).read_bytes() == manifest_bytes(m)  # its data id is unchanged
    n = load_manifest(small_data).tokens("train") // 64 + 30  # into the second epoch
    for kw in ({}, {"shuffle": False}, {"micro_batch_size": 3, "dp_size": 2, "dp_rank": 1}):
        new_batches, old_batches = tokens(small_data, n, **kw), tokens(old, n, **kw)
        assert all(torch.equal(a, b) for a, b in zip(new_batches, old_batches, strict=True))
    assert locate(str(old)).data_id != locate(str(small_data)).data_id  # other manifests


def test_shards_stay_webdataset_tars(small_data: Path) -> None:
    m = load_manifest(small_data)
    keys = [s["__key__"] for s in wds.WebDataset(str(m.shards("train")[0]), shardshuffle=False)]
    assert len(keys) == m.split("train").shards[0].samples


@pytest.mark.parametrize("layout", ["old", "new"])
def test_damage_is_caught_in_both_layouts(tmp_path: Path, small_data: Path, layout: str) -> None:
    root = Path(shutil.copytree(small_data, tmp_path / "new"))
    if layout == "old":
        root = old_layout(root, tmp_path / "old")
    m = load_manifest(root)
    victim, info = m.shards("train")[0], m.split("train").shards[0]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 1  # one bit flipped in the first sample
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {re.escape(str(victim))} is corrupt") as e:
        tokens(root, 2, shuffle=False)
    assert hashlib.sha256(data).hexdigest()[:16] in str(e.value)
    assert info.sha256[:16] in str(e.value)


def test_an_edited_xxh3_is_named(tmp_path: Path, small_data: Path) -> None:
    """The sha256s agree, the xxh3s do not (a hand-edited manifest): the message names xxh3."""
    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["splits"]["train"]["shards"][0]["xxh3_64"] = "0" * 16
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"is corrupt \(.*xxh3_64 .*, the manifest's 0000"):
        tokens(root, 2, shuffle=False)


def test_unknown_format_version_is_refused(tmp_path: Path, small_data: Path) -> None:
    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["format_version"] = 3
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="format_version 3, this code reads 1 and 2"):
        load_manifest(root)
