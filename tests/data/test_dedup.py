"""Near-duplicate removal: MinHash signatures, LSH parameters, and `--dedup` end to end."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from megalite.data.dedup import MinHasher, NearDupIndex, lsh_params, shingle_hashes
from megalite.data.manifest import load_manifest
from megalite.data.prepare import prepare
from tests.data.helpers import split_documents, write_jsonl

WORDS = [f"{a}{b}{c}" for a in "bcdfgk" for b in "aeiou" for c in "lmnrst"]  # 180 words


def random_doc(rng: random.Random, n_words: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n_words)]


def edited(rng: random.Random, words: list[str], edits: int) -> list[str]:
    """A copy with `edits` words replaced or inserted (alternately)."""
    out = list(words)
    for k in range(edits):
        i = rng.randrange(len(out))
        if k % 2:
            out.insert(i, rng.choice(WORDS))
        else:
            out[i] = rng.choice(WORDS)
    return out


def jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    sa = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_signatures_are_fixed_and_estimate_jaccard() -> None:
    # Pinned: a change here changes which documents preparation drops (bump PREPARE_VERSION).
    sig = MinHasher(4).signatures(["The quick brown fox jumps over the lazy dog"])
    assert sig.dtype == np.uint32 and sig.shape == (1, 4)
    assert sig.tolist() == [[1202889898, 751019069, 1189992620, 871730875]]
    # Normalisation: case and whitespace do not matter; fewer than 5 words make one shingle.
    same = MinHasher(16).signatures(["A  b\nC d e f", "a b c D e\tf", "a b c"])
    assert (same[0] == same[1]).all() and len(shingle_hashes("a b c")) == 1
    rng = random.Random(0)
    hasher = MinHasher(256)
    for edits in (2, 6, 20):
        base = random_doc(rng, 150)
        copy = edited(rng, base, edits)
        a, b = hasher.signatures([" ".join(base), " ".join(copy)])
        assert abs((a == b).mean() - jaccard(base, copy)) < 0.08, edits


def test_lsh_params_follow_the_threshold() -> None:
    assert lsh_params(0.8, 128) == (14, 9)
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        s = np.array([threshold - 0.2, threshold + 0.05])
        p = 1 - (1 - s**rows) ** bands  # probability of becoming a candidate
        assert p[0] < 0.5 < 0.9 < p[1]


def test_index_keeps_the_first_and_drops_later_near_copies() -> None:
    rng = random.Random(1)
    hasher = MinHasher(128)
    index = NearDupIndex(0.8, 128)
    base = random_doc(rng, 200)
    other = random_doc(rng, 200)
    texts = [base, edited(rng, base, 2), other, base, edited(rng, other, 1)]
    kept = [index.add_if_new(s) for s in hasher.signatures([" ".join(t) for t in texts])]
    assert kept == [True, False, True, False, False]


def planted_corpus(seed: int = 2) -> tuple[list[str], list[str]]:
    """(originals, inputs): distinct documents, then near-copies (2 words edited or inserted)
    and exact copies of some of them mixed in after their original."""
    rng = random.Random(seed)
    originals = [random_doc(rng, rng.randint(150, 250)) for _ in range(40)]
    inputs = [" ".join(d) for d in originals]
    copies = [" ".join(edited(rng, originals[i], 2)) for i in range(0, 40, 2)]
    copies += [inputs[i] for i in range(1, 40, 4)]  # 10 exact copies
    rng.shuffle(copies)
    return [" ".join(d) for d in originals], inputs + copies


def decoded(root: Path) -> list[str]:
    tok = Tokenizer.from_file(str(load_manifest(root).tokenizer_path))
    return [tok.decode(d) for d in split_documents(root, "train")]


def test_minhash_drops_planted_near_duplicates_only(tmp_path: Path) -> None:
    originals, inputs = planted_corpus()
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in inputs])
    m = prepare([src], tmp_path / "mh", vocab_size=300, val_fraction=0.0, dedup="minhash")
    assert decoded(tmp_path / "mh") == originals  # every original kept, first seen, in order
    assert m.stats["duplicates_dropped"] == 10 and m.stats["near_duplicates_dropped"] == 20
    assert m.stats["documents_kept"] == 40

    m = prepare([src], tmp_path / "none", vocab_size=300, val_fraction=0.0, dedup="none")
    assert "duplicates_dropped" not in m.stats and m.split("train").documents == 70
    m = prepare([src], tmp_path / "exact", vocab_size=300, val_fraction=0.0)
    assert "near_duplicates_dropped" not in m.stats
    assert (m.stats["duplicates_dropped"], m.stats["documents_kept"]) == (10, 60)


def test_dedup_none_puts_copies_in_one_split(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "same text"}] * 3)
    m = prepare([src], tmp_path / "out", vocab_size=300, val_fraction=0.5, dedup="none")
    # All three copies score the same, so all land in one split; the plan moves exactly one
    # (the first) to make the other split non-empty.
    assert sorted(s.documents for s in m.splits.values()) == [1, 2]
