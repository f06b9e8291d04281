"""The bundled tinyshakespeare, prepared on first use: data for demos and tests with no download.

The folder name carries a hash of the text, the options and the code versions that shape the
output, so a change to any of them prepares afresh instead of reusing stale shards. Preparation
happens in a private temporary folder that is renamed into place: several processes (e.g. the ranks
of one job) may call this at once, and each ends up with the same complete folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypedDict

import tokenizers

from megalite.data.errors import DataError
from megalite.data.manifest import FORMAT_VERSION, MANIFEST_NAME
from megalite.data.prepare import PREPARE_VERSION, prepare

SAMPLE_TEXT = Path(__file__).parent / "samples" / "tinyshakespeare.txt"
SAMPLE_VAL_FRACTION = 0.05  # ~5% of 7k paragraphs: a val split big enough to be meaningful

log = logging.getLogger(__name__)


class _SampleOptions(TypedDict):  # the `prepare` options of the sample, hashed into its name
    vocab_size: int
    val_fraction: float
    sample_tokens: int
    shard_tokens: int
    seed: int


def prepare_sample(cache_dir: str | Path, *, vocab_size: int = 4096) -> Path:
    """Return `cache_dir/shakespeare-v<vocab>-<hash>/`, a prepared folder, preparing it if needed.

    Later calls return at once. Safe to call from several processes at the same time.
    """
    cache = Path(cache_dir).expanduser()
    options: _SampleOptions = {
        "vocab_size": vocab_size,
        "val_fraction": SAMPLE_VAL_FRACTION,
        "sample_tokens": 2048,
        "shard_tokens": 2**24,
        "seed": 0,
    }
    versions = {
        "prepare": PREPARE_VERSION,
        "format": FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
    }
    digest = hashlib.sha256(SAMPLE_TEXT.read_bytes())
    digest.update(json.dumps([options, versions], sort_keys=True).encode())
    final = cache / f"shakespeare-v{vocab_size}-{digest.hexdigest()[:12]}"
    if (final / MANIFEST_NAME).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        log.info("preparing the bundled tinyshakespeare into %s", final)
        prepare([SAMPLE_TEXT], tmp, **options)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first: use the winner's
            if not (final / MANIFEST_NAME).is_file():
                raise DataError(f"{final} exists but is incomplete: remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
