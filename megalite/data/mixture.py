"""Which source each window of a mixture comes from.

Window w of the global stream is drawn from source k with probability weight_k: a uniform number
from a seeded hash of (seed, w) is looked up in the cumulative weights. The choice is a pure
function of (seed, weights, w), so it is the same for every rank and every data-parallel layout,
and a stream that knows how many windows each source has given so far can continue exactly.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megalite.config import ConfigError, DataConfig
from megalite.data.errors import DataError
from megalite.data.shards import Location, is_pattern
from megalite.data.source import mix64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture: a prepared folder or shard pattern (see shards.py), its weight
    and the name its metrics are logged under."""

    path: str
    weight: float = 1.0
    name: str = ""


def normalise(specs: list[SourceSpec], *, warn: bool = True) -> list[SourceSpec]:
    """Checked specs with names and weights summing to 1; zero-weight sources left out.

    Raises `DataError` for no source, a negative or non-finite weight, all weights zero or two
    sources with one name. Weights that do not sum to 1 are scaled, and the log says so (unless
    `warn` is False: a check whose caller normalises later).
    """
    if not specs:
        raise DataError(
            "the data mixture has no source: give data.sources=[{path: ..., weight: ...}]"
        )
    named = [SourceSpec(s.path, float(s.weight), s.name or default_name(s.path)) for s in specs]
    names = [s.name for s in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"two data sources are named {dup!r}: give each a distinct name")
    for s in named:
        if not math.isfinite(s.weight) or s.weight < 0:
            raise DataError(f"data source {s.name!r} has weight {s.weight}: weights are ≥ 0")
    for s in named:
        if s.weight == 0 and warn:
            log.warning("data source %r has weight 0: it is left out", s.name)
    kept = [s for s in named if s.weight > 0]
    if not kept:
        raise DataError("every data source has weight 0: give at least one a positive weight")
    total = sum(s.weight for s in kept)
    if warn and not math.isclose(total, 1.0, rel_tol=1e-9):
        log.warning("data source weights sum to %g: normalised to sum to 1", total)
    return [SourceSpec(s.path, s.weight / total, s.name) for s in kept]


def configured_sources(d: DataConfig, *, warn: bool = True) -> list[SourceSpec]:
    """The run's sources, checked and normalised (`normalise`): `data.sources`, or `data.path`
    as the only one."""
    if d.sources:
        specs = [SourceSpec(s.path, s.weight, s.name) for s in d.sources]
    elif d.path is not None:
        specs = [SourceSpec(d.path)]
    else:
        raise ConfigError("no data: set data.path=DIR or data.sources=[...]")
    return normalise(specs, warn=warn)


def check_sources(d: DataConfig) -> None:
    """ConfigError, before any process starts, unless every configured folder exists (patterns
    and URLs are opened later) and a mixture's weights are valid."""
    for path in [d.path] if d.path is not None else [s.path for s in d.sources]:
        if not (is_pattern(path) or Path(path).expanduser().exists()):
            raise ConfigError(f"data path {path} does not exist: run tools/prepare_data.py")
    if d.sources:
        try:
            configured_sources(d, warn=False)  # checks only: the launcher says it once
        except DataError as exc:
            raise ConfigError(str(exc)) from None


def check_tokenizers(located: list[tuple[SourceSpec, Location]]) -> None:
    """Raise `DataError` unless all sources were prepared with one tokenizer."""
    first_spec, first = located[0]
    for spec, loc in located[1:]:
        if loc.manifest.tokenizer_sha256 != first.manifest.tokenizer_sha256:
            raise DataError(
                f"data sources {first_spec.name!r} and {spec.name!r} were prepared with different "
                "tokenizers: prepare every source with the same --tokenizer"
            )


def default_name(path: str) -> str:
    """A source's metrics name from its path: the prepared folder's name."""
    head = path.split("::")[0].rstrip("/")
    if "/train/shard-" in head:
        head = head[: head.rindex("/train/shard-")]
    return os.path.basename(head.split()[-1] if " " in head else head) or head


def choose(cumulative: np.ndarray, seed: int, first: int, n: int) -> np.ndarray:
    """Source index of windows [first, first + n) (n,), for cumulative weights ending in 1."""
    if len(cumulative) == 1:
        return np.zeros(n, dtype=np.int64)
    u = _uniform(seed, first, n)  # (n,)
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1)


def _uniform(seed: int, first: int, n: int) -> np.ndarray:
    """Uniform [0, 1) floats for windows [first, first + n) (n,)."""
    x = mix64(first, n, seed, "mixture")
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)
