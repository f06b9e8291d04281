"""`prepare_data.py stats DIR`: the numbers match the manifest and the shards; the plot is a PNG."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from megalite.data.cli import main
from megalite.data.manifest import load_manifest
from megalite.data.stats import compute_stats, length_histogram
from tests.data.helpers import split_documents, split_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_stats_match_manifest_and_shards(small_data: Path) -> None:
    m = load_manifest(small_data)
    stats = compute_stats(m)
    assert list(stats) == list(m.splits)
    for name, split in stats.items():
        info = m.split(name)
        assert (split.tokens, split.documents, split.samples) == (
            info.tokens,
            info.documents,
            info.samples,
        )
        assert [(s.path, s.tokens, s.documents, s.samples) for s in split.shards] == [
            (s.path, s.tokens, s.documents, s.samples) for s in info.shards
        ]
        docs = split_documents(small_data, name)
        assert split.lengths.tolist() == [len(d) for d in docs]  # across sample/shard bounds
        flat = split_tokens(small_data, name)
        counts = np.bincount(flat, minlength=m.vocab_size)
        assert np.array_equal(split.token_counts, counts)


def test_length_histogram_bins() -> None:
    assert length_histogram(np.array([0, 1, 2, 3, 4, 7, 8, 100])) == [
        (0, 1, 1), (1, 2, 1), (2, 4, 2), (4, 8, 2), (8, 16, 1), (16, 32, 0), (32, 64, 0),
        (64, 128, 1),
    ]  # fmt: skip
    assert length_histogram(np.array([5, 6])) == [(4, 8, 2)]
    assert length_histogram(np.zeros(0, dtype=int)) == []


def test_stats_command(
    tmp_path: Path, small_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    m = load_manifest(data)
    assert main(["stats", str(data), "--plot", "--top", "3"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "shard/s" in captured.err  # the progress bar over shards
    assert (data / "stats.png").read_bytes().startswith(PNG_MAGIC)
    for name, info in m.splits.items():
        line = (
            f"{name}: {info.tokens:,} tokens, {info.documents:,} documents, "
            f"{info.samples:,} samples in {len(info.shards)} shard(s)"
        )
        assert line in out
        for s in info.shards:
            assert re.search(rf"{s.path}\s+{s.tokens:,}\s+{s.documents:,}\s+{s.samples:,}", out)
    assert out.count("top 3 tokens:") == 2
    tok = Tokenizer.from_file(str(m.tokenizer_path))
    counts = np.bincount(split_tokens(data, "train"), minlength=m.vocab_size)
    top = np.argsort(-counts, kind="stable")[:3]
    for i in top:  # id, count, share, the token decoded by the folder's tokenizer
        text = repr(tok.decode([int(i)]))
        assert re.search(rf"\s{i}\s+{counts[i]:,}\s+[\d.]+%\s+{re.escape(text)}", out)

    assert main(["stats", str(data), "--plot", str(tmp_path / "p" / "x.png"), "--top", "0"]) == 0
    assert (tmp_path / "p" / "x.png").read_bytes().startswith(PNG_MAGIC)
    assert "top" not in capsys.readouterr().out
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    assert "prepare_data: error: data folder" in capsys.readouterr().err
