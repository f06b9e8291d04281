"""Near-duplicate removal: MinHash signatures and LSH banding, in numpy, deterministic.

Shingles are word 5-grams (Lee et al. 2021, datatrove) of the text lowercased with whitespace
collapsed; a document of fewer than 5 words is one shingle. Word n-grams cost a fifth of
character n-grams for the same text; one edited word changes up to 5 shingles.

Hashing never uses Python's salted `hash()`: a shingle's hash is a polynomial hash of its UTF-8
bytes mod 2^64 (computed for all shingles of a document at once from prefix sums), mixed by the
murmur3 finaliser; permutation k is the multiply-shift hash `(a_k·x + b_k) mod 2^64 >> 32` with
fixed constants derived by blake2b. A signature is the per-permutation minimum, `perms` uint32s.

LSH: the signature is cut into `bands` bands of `rows` rows; two documents are candidates when
they agree on a whole band. `lsh_params` picks bands × rows ≤ perms so that candidates are likely
above the threshold and unlikely below it (false negatives weigh more: a false positive only
costs a check). A candidate is a near-duplicate when the share of agreeing signature entries (an
estimate of the Jaccard similarity) is ≥ the threshold. Documents are checked in input order
against the kept ones, so the first-seen document stays and its later near-copies go.

Memory: the index keeps, per kept document, its signature (4·perms bytes) and `bands` dict
entries.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from megalite.data.errors import DataError

NGRAM = 5
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33, _S32 = np.uint64(33), np.uint64(32)
_CHUNK = 1024  # shingles hashed at once: bounds the (shingles, perms) matrix
_FN_WEIGHT = 0.9  # weight of false negatives against false positives in `lsh_params`


def _constant(name: str, k: int) -> int:
    digest = hashlib.blake2b(f"megalite-minhash-{name}-{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def fmix64(x: np.ndarray) -> np.ndarray:
    """The murmur3 64-bit finaliser: a bijection with full avalanche, elementwise on uint64."""
    x = x ^ (x >> _S33)
    x = x * _M1
    x = x ^ (x >> _S33)
    x = x * _M2
    return x ^ (x >> _S33)


def shingle_hashes(text: str, *, ngram: int = NGRAM) -> np.ndarray:
    """uint64 hashes of the word `ngram`-grams of `text`, lowercased and whitespace-collapsed."""
    data = " ".join(text.lower().split()).encode()
    if not data:
        return np.zeros(0, dtype=np.uint64)
    c = np.frombuffer(data, dtype=np.uint8).astype(np.uint64) + np.uint64(1)
    n = len(c)
    inv_pow = np.cumprod(np.full(n, _BASE_INV, dtype=np.uint64)) * _BASE  # B^-j, j = 0..n-1
    base_pow = np.cumprod(np.full(n, _BASE, dtype=np.uint64)) * _BASE_INV  # B^j
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(c * inv_pow, out=prefix[1:])  # prefix[i] = Σ_{j<i} c_j B^-j
    spaces = np.flatnonzero(c == np.uint64(ord(" ") + 1))
    starts = np.concatenate([[0], spaces + 1])  # (words,)
    ends = np.concatenate([spaces, [n]])
    k = min(ngram, len(starts))
    lo, hi = starts[: len(starts) - k + 1], ends[k - 1 :]  # byte span of each shingle
    poly = (prefix[hi] - prefix[lo]) * base_pow[hi - 1]  # Σ c_j B^(hi-1-j)
    return fmix64(poly ^ (hi - lo).astype(np.uint64))


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures of `perms` uint32s; the same text gives the same signature anywhere."""

    perms: int = 128

    def __post_init__(self) -> None:
        if self.perms < 2:
            raise DataError(f"--minhash-perms {self.perms} must be ≥ 2")

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), perms) uint32 signatures."""
        a, b = _perm_params(self.perms)
        out = np.empty((len(texts), self.perms), dtype=np.uint32)
        for i, text in enumerate(texts):
            x = shingle_hashes(text)
            sig = np.full(self.perms, np.iinfo(np.uint64).max, dtype=np.uint64)
            for start in range(0, len(x), _CHUNK):
                h = x[start : start + _CHUNK, None] * a + b  # (chunk, perms)
                np.minimum(sig, (h >> _S32).min(axis=0), out=sig)
            out[i] = sig
        return out


@functools.lru_cache
def _perm_params(perms: int) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (odd) and offsets of the `perms` multiply-shift hashes."""
    a = np.array([_constant("a", k) | 1 for k in range(perms)], dtype=np.uint64)
    b = np.array([_constant("b", k) for k in range(perms)], dtype=np.uint64)
    return a, b


@functools.lru_cache
def lsh_params(threshold: float, perms: int) -> tuple[int, int]:
    """(bands, rows), bands·rows ≤ perms, minimising the weighted probability mass of false
    positives (similarity s < threshold yet a candidate) and false negatives (s ≥ threshold yet
    not): P(candidate | s) = 1 - (1 - s^rows)^bands."""
    s = np.linspace(0.0, 1.0, 1001)
    below, above = s < threshold, s >= threshold
    best: tuple[float, int, int] | None = None
    for bands in range(1, perms + 1):
        for rows in range(1, perms // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            err = (1 - _FN_WEIGHT) * p[below].sum() + _FN_WEIGHT * (1.0 - p[above]).sum()
            if best is None or err < best[0] - 1e-12:
                best = (err, bands, rows)
    assert best is not None
    return best[1], best[2]


class NearDupIndex:
    """The kept documents' signatures, banded; `add_if_new` decides one document at a time."""

    def __init__(self, threshold: float, perms: int) -> None:
        if not 0.0 < threshold <= 1.0:
            raise DataError(f"--dedup-threshold {threshold} must be in (0, 1]")
        self.threshold, self.perms = threshold, perms
        self.bands, self.rows = lsh_params(threshold, perms)
        self._seeds = np.array([_constant("band", k) for k in range(self.bands)], np.uint64)
        self._buckets: dict[int, list[int]] = {}  # band key → kept documents with that band
        self._sigs = np.zeros((1024, perms), dtype=np.uint32)  # kept signatures, then room
        self._kept = 0

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64 keys of the signatures' bands (band index mixed in)."""
        bands = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows)
        h = np.broadcast_to(self._seeds, (len(sigs), self.bands))
        for r in range(self.rows):
            h = fmix64(h ^ bands[:, :, r].astype(np.uint64))
        return h

    def add_batch(self, sigs: np.ndarray) -> list[bool]:
        """`add_if_new` for each row of `sigs` (n, perms), in order."""
        return [self._add(s, k) for s, k in zip(sigs, self.band_keys(sigs).tolist(), strict=True)]

    def add_if_new(self, sig: np.ndarray) -> bool:
        """True (and `sig` is indexed) unless a kept document's estimated Jaccard similarity
        with it reaches the threshold; then False and nothing changes."""
        return self.add_batch(sig[None])[0]

    def _add(self, sig: np.ndarray, keys: list[int]) -> bool:
        candidates = {i for key in keys for i in self._buckets.get(key, ())}
        if candidates:
            agree = (self._sigs[sorted(candidates)] == sig).sum(axis=1)
            if agree.max() >= self.threshold * self.perms:
                return False
        if self._kept == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self._kept] = sig
        for key in keys:
            self._buckets.setdefault(key, []).append(self._kept)
        self._kept += 1
        return True
