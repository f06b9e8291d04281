"""Small prepared folders shared by the data tests, built from generated text."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite.data.prepare import prepare
from tests.data.datagen import SAMPLE_TOKENS, SHARD_TOKENS, make_texts, write_txt


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_txt(tmp_path_factory.mktemp("corpus") / "corpus.txt", make_texts(400))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A prepared folder with dozens of 8-sample shards in train and a few in val."""
    out = tmp_path_factory.mktemp("small_data")
    prepare(
        [corpus],
        out,
        vocab_size=300,
        val_fraction=0.1,
        sample_tokens=SAMPLE_TOKENS,
        shard_tokens=SHARD_TOKENS,
    )
    return out


@pytest.fixture(scope="session")
def one_shard_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder whose train split is a single shard of a few samples."""
    src = write_txt(tmp_path_factory.mktemp("one_shard_src") / "c.txt", make_texts(30, seed=1))
    out = tmp_path_factory.mktemp("one_shard_data")
    prepare([src], out, vocab_size=300, val_fraction=0.0, sample_tokens=64, shard_tokens=2**20)
    return out
