"""Where a prepared dataset lives, and reading its files with retries.

A data source is named by one string, `data.path` or a mixture source's `path`:
- a local folder written by `tools/prepare_data.py`: `/data/web`;
- a pattern of its train shards, brace-expanded as WebDataset does (`::` joins patterns), each a
  local path or any URL WebDataset's `gopen` opens, `pipe:` commands included, so object stores
  work through their CLI: `/lustre/web/train/shard-{000000..000099}.tar`,
  `pipe:aws s3 cp s3://bucket/web/train/shard-{000000..000099}.tar -`.
  The folder's other files are found by putting their path where the first URL has its shard's
  (`train/shard-000000.tar`): `.../web/manifest.json`, `.../web/val/shard-000000.tar`. The train
  split is the shards the pattern names (a subset selects part of a dataset); val is all of it.

The manifest still says how many tokens each shard holds and its checksum (xxh3-64, or sha256 in
a format-1 folder), so planning reads no shard and every read is checked. A read that fails (the
file is missing, the command exits non-zero, a URL's bytes do not match the manifest or its
manifest does not parse: a partial download) is retried with exponential backoff, then reported
as a `DataError` naming the shard. A local file whose bytes do not match is damaged, not flaky:
it fails at once, naming both hashes. A local file is hashed while it is read, with the algorithm
its check wants (`read_checked`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from megalite.data.codec import Hashed, decode_shard, read_hashed
from megalite.data.errors import DataError
from megalite.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    load_manifest,
    manifest_bytes,
    parse_manifest,
)

log = logging.getLogger(__name__)

_SHARD_IN_URL = re.compile(r"(\w+)/shard-\d{6}\.tar")  # a shard's path in its prepared folder
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*:)")  # pipe:, file:, s3:, https:, ...
T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """`attempts` reads at most, waiting `delay_s`, 2·`delay_s`, 4·`delay_s`... in between."""

    attempts: int = 4
    delay_s: float = 1.0


DEFAULT_RETRY = Retry()


@dataclass(frozen=True)
class Location:
    """A prepared dataset as a reader sees it: its manifest and, per split, its shards' URLs."""

    spec: str
    manifest: Manifest
    shards: dict[str, list[tuple[str, ShardInfo]]]  # split → [(url or path, info)]

    @property
    def data_id(self) -> str:
        """Identifies the data read: the manifest, plus the selected train shards of a pattern."""
        digest = hashlib.sha256(manifest_bytes(self.manifest))
        if is_pattern(self.spec):
            digest.update(repr([info.path for _, info in self.shards["train"]]).encode())
        return digest.hexdigest()[:16]

    def split(self, split: str) -> list[tuple[str, ShardInfo]]:
        self.manifest.split(split)  # a DataError that lists the splits there are
        return self.shards[split]


def is_pattern(spec: str) -> bool:
    """True for a shard pattern or URL, False for a plain local folder."""
    return bool(_URL.match(spec)) or "{" in spec or "::" in spec


def locate(spec: str, *, retry: Retry = DEFAULT_RETRY) -> Location:
    """The `Location` of a folder or shard pattern (see the module docstring)."""
    if not is_pattern(spec):
        manifest = load_manifest(spec)
        shards = {
            name: [(str(manifest.root / s.path), s) for s in info.shards]
            for name, info in manifest.splits.items()
        }
        return Location(spec, manifest, shards)
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if not urls:
        raise DataError(f"data pattern {spec!r} expands to no shard")
    first = _shard_span(urls[0], spec)
    manifest_url = _swap(urls[0], first, MANIFEST_NAME)
    manifest = read_checked(
        manifest_url,
        lambda raw: parse_manifest(bytes(raw), root=Path(manifest_url).parent, name=manifest_url),
        what=f"manifest {manifest_url}",
        retry=retry,
    )
    by_path = {s.path: s for info in manifest.splits.values() for s in info.shards}
    train = []
    for url in urls:
        span = _shard_span(url, spec)
        rel = url[span[0] : span[1]]
        if rel not in by_path or not rel.startswith("train/"):
            raise DataError(
                f"{url} is not a train shard listed in {manifest_url}: a data pattern names "
                "train shards of one prepared folder"
            )
        train.append((url, by_path[rel]))
    shards = {
        name: [(_swap(urls[0], first, s.path), s) for s in info.shards]
        for name, info in manifest.splits.items()
    }
    shards["train"] = train
    return Location(spec, manifest, shards)


def read_shard_at(
    url: str, info: ShardInfo, *, dtype: str, retry: Retry = DEFAULT_RETRY
) -> list[np.ndarray]:
    """The samples of the shard at `url` (path or URL), checked against `info`; retried."""
    return read_checked(
        url,
        lambda data: decode_shard(data, info, dtype=dtype, name=url),
        what=f"shard {url}",
        retry=retry,
        checksum=info.checksum[0],
    )


def read_checked(
    url: str,
    check: Callable[[bytes | Hashed], T],
    *,
    what: str,
    retry: Retry,
    checksum: str = "sha256",
) -> T:
    """`check` of the bytes at `url`. A URL's bytes may be a partial download, so a failed check
    is retried with the read; a local file's bytes are what is on disk, so a failed check
    (damage) raises at once, and only the read itself (a network file system's hiccup) is
    retried. A local file's bytes come hashed with `checksum` (the algorithm `check` compares)."""
    if _URL.match(url):
        return with_retries(lambda: check(read_bytes(url)), what=what, retry=retry)
    return check(with_retries(lambda: read_bytes(url, checksum), what=what, retry=retry))


def read_bytes(url: str, checksum: str = "sha256") -> bytes | Hashed:
    """All bytes of a local path (`Hashed`: with their `checksum`, hashed as they are read) or a
    WebDataset URL; OSError when it cannot be read whole."""
    if not _URL.match(url):
        return read_hashed(url, checksum)
    if url.startswith("pipe:"):  # as gopen runs it, with the command's own error kept
        done = subprocess.run(url[5:], shell=True, capture_output=True)
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            raise OSError(f"command exited with status {done.returncode}: {said[-1]}")
        return done.stdout
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:  # a pipe: raises at close when its command exits non-zero
        return f.read()


def with_retries(fn: Callable[[], T], *, what: str, retry: Retry) -> T:
    """`fn()`, retried on OSError and DataError; the last failure as a DataError naming `what`."""
    for attempt in range(retry.attempts):
        try:
            return fn()
        except (OSError, DataError) as exc:
            error = exc
        if attempt + 1 < retry.attempts:
            delay = retry.delay_s * 2**attempt
            log.warning("reading %s failed (%s); retrying in %.1f s", what, error, delay)
            time.sleep(delay)
    n = retry.attempts
    raise DataError(
        f"cannot read {what} ({n} attempt{'s' if n != 1 else ''}): {_reason(error)}"
    ) from error


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _shard_span(url: str, spec: str) -> tuple[int, int]:
    matches = list(_SHARD_IN_URL.finditer(url))
    if not matches:
        raise DataError(
            f"data pattern {spec!r} gives {url!r}, which names no shard of a prepared folder "
            "(…/train/shard-NNNNNN.tar)"
        )
    return matches[-1].span()


def _swap(url: str, span: tuple[int, int], rel: str) -> str:
    return url[: span[0]] + rel + url[span[1] :]
