"""Generated texts for the data tests (nothing is downloaded); the fixtures are in conftest.py."""

from __future__ import annotations

import random
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fu", "gi", "ha"]

# Small samples and shards, so a few hundred short documents give many shards and samples.
SAMPLE_TOKENS = 48
SHARD_TOKENS = 8 * SAMPLE_TOKENS  # 8 samples per shard


def make_texts(n_docs: int, *, seed: int = 0) -> list[str]:
    """`n_docs` distinct pseudo-words paragraphs (the index makes each one unique)."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    texts = []
    for i in range(n_docs):
        body = " ".join(rng.choices(words, k=rng.randint(3, 40)))
        texts.append(f"Doc {i}: {body}.")
    return texts


def write_txt(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path
