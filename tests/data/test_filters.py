"""Quality filters, the `--max-tokens` cap and the per-stage counts in manifest and summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megalite.data.cli import main
from megalite.data.errors import DataError
from megalite.data.filters import symbol_fraction
from megalite.data.manifest import load_manifest
from megalite.data.prepare import prepare
from tests.data.datagen import make_texts
from tests.data.helpers import split_documents, split_tokens, write_jsonl


def test_symbol_fraction() -> None:
    assert symbol_fraction("") == 0.0
    assert symbol_fraction("ab c\n") == 0.0
    assert symbol_fraction("a_#$") == 0.75  # "_" counts as a symbol
    assert symbol_fraction("é1 ü") == 0.0  # Unicode letters and digits are alphanumeric


def test_filters_drop_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        "a fine document of ordinary length",
        "short",  # < 10 chars (and not symbol-heavy)
        "x" * 61,  # > 60 chars
        "@@ ## $$ %% && ** !! ok",  # 14 of 23 characters are symbols
        "#!",  # short and symbol-heavy: charged to the first filter, min-chars
        "another fine document, with a comma.",
        "",
        "a fine document of ordinary length",  # exact duplicate
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in records])
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--vocab-size", "300"]
    opts = ["--val-fraction", "0", "--min-chars", "10", "--max-chars", "60"]
    assert main([*args, *opts, "--max-symbol-fraction", "0.3"]) == 0
    m = load_manifest(tmp_path / "out")
    assert m.stats == {
        "input_files": 1,
        "documents_read": 8,
        "empty_dropped": 1,
        "min_chars_dropped": 2,
        "max_chars_dropped": 1,
        "symbol_fraction_dropped": 1,
        "duplicates_dropped": 1,
        "documents_kept": 2,
    }
    assert m.split("train").documents == 2
    out = capsys.readouterr().out
    assert "dropped: 1 empty, 2 shorter than --min-chars, 1 longer than --max-chars" in out
    assert "1 over --max-symbol-fraction, 1 duplicates; 2 kept" in out


def test_max_tokens_keeps_a_prefix_of_whole_documents(tmp_path: Path) -> None:
    texts = make_texts(120, seed=4)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    common = dict(vocab_size=300, val_fraction=0.1, sample_tokens=16, shard_tokens=64)
    full = prepare([src], tmp_path / "full", **common)
    cap = full.tokens("train") // 3
    m = prepare([src], tmp_path / "cap", max_tokens=cap, **common)
    written = m.tokens("train") + m.tokens("val")
    kept = m.split("train").documents + m.split("val").documents
    assert m.stats["documents_kept"] == kept < 120
    assert m.stats["max_tokens_dropped"] == 120 - kept
    # Each split holds a prefix of its documents in the full run, and the cap was first
    # reached by the last document written: without it, fewer than `cap` tokens.
    lengths = {}
    for split in ("train", "val"):
        docs, ref = (
            split_documents(tmp_path / "cap", split),
            split_documents(tmp_path / "full", split),
        )
        assert docs == ref[: len(docs)]
        lengths[split] = [len(d) + 1 for d in docs]
    assert written >= cap
    assert written - max(lengths["train"][-1], lengths["val"][-1]) < cap
    assert np.array_equal(split_tokens(tmp_path / "cap", "train")[:32],
                          split_tokens(tmp_path / "full", "train")[:32])  # fmt: skip


def test_max_tokens_can_leave_out_val_but_not_train(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(6, seed=1)])
    outcomes = set()
    for seed in range(8):
        try:
            m = prepare([src], tmp_path / f"s{seed}", vocab_size=300, val_fraction=0.5, seed=seed,
                        max_tokens=1)  # fmt: skip
        except DataError as exc:
            assert "--max-tokens 1 leaves no training documents" in str(exc)
            outcomes.add("error")
            continue
        assert list(m.splits) == ["train"] and m.split("train").documents == 1
        assert not (tmp_path / f"s{seed}" / "val").exists()
        outcomes.add("train only")
    assert outcomes == {"error", "train only"}
