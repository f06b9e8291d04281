"""`--workers N`: the same bytes as one worker, whatever the tokenizer and stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megalite.data.cli import main
from megalite.data.errors import DataError
from megalite.data.parallel import Workers
from tests.data.datagen import make_texts
from tests.data.helpers import folder_files, train_sentencepiece, write_jsonl


def corpus(path: Path) -> Path:
    texts = make_texts(300, seed=11)
    near = [t.replace(" ", "  ", 1) + " ka" for t in texts[:40]]  # exact after whitespace, +1 word
    return write_jsonl(path, [{"text": t} for t in texts + near + texts[:10]])


def test_two_workers_write_the_same_bytes(tmp_path: Path) -> None:
    src = corpus(tmp_path / "in.jsonl")
    sp_model = train_sentencepiece(tmp_path / "sp.model")
    runs = {
        "bpe": ["--vocab-size", "300", "--dedup", "minhash", "--min-chars", "20"],
        "sp": ["--tokenizer", str(sp_model), "--dedup", "minhash", "--max-tokens", "4000"],
    }
    for name, opts in runs.items():
        outs = []
        for workers in ("1", "2"):
            out = tmp_path / f"{name}-{workers}"
            args = ["--input", str(src), "--output", str(out), "--workers", workers]
            assert main([*args, "--sample-tokens", "64", "--shard-tokens", "256", *opts]) == 0
            outs.append(folder_files(out))
        assert outs[0] == outs[1], name
        assert len([f for f in outs[0] if f.startswith("train/")]) > 5, name
        assert json.loads(outs[0]["manifest.json"])["stats"]["near_duplicates_dropped"] >= 30


def test_workers_map_in_order_and_pass_errors() -> None:
    with Workers(2) as pool:
        assert list(pool.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        with pytest.raises(ValueError, match="invalid literal"):
            list(pool.map(int, ["1", "x"]))
        with pytest.raises(DataError, match="a worker process died"):
            list(pool.map(os._exit, [3]))  # a worker killed mid-task fails the map, no hang
