"""Helpers for the data-preparation tests: writing inputs, reading prepared folders back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megalite.data.codec import read_shard
from megalite.data.manifest import load_manifest
from tests.data.datagen import make_texts


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def split_tokens(root: Path, split: str) -> np.ndarray:
    """A split's whole token stream, shard by shard, as int64."""
    m = load_manifest(root)
    pairs = zip(m.shards(split), m.split(split).shards, strict=True)
    samples = [s for path, info in pairs for s in read_shard(path, info, dtype=m.dtype)]
    return np.concatenate(samples).astype(np.int64)


def split_documents(root: Path, split: str) -> list[list[int]]:
    """A split's documents as token id lists (the stream cut at each EOD token)."""
    m = load_manifest(root)
    flat = split_tokens(root, split).tolist()
    docs, start = [], 0
    for i, t in enumerate(flat):
        if t == m.eod_token_id:
            docs.append(flat[start:i])
            start = i + 1
    assert start == len(flat), "every split ends with an EOD token"
    return docs


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path → bytes): two runs compare equal byte for byte."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def train_sentencepiece(path: Path, **options: object) -> Path:
    """A tiny SentencePiece BPE model (vocab 120) trained on generated text."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(200)),
        model_writer=model,
        vocab_size=120,
        model_type="bpe",
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())
    return path
