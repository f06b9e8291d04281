"""Document-level quality filters and the per-stage drop counts of data preparation.

A document passes the stages in a fixed order, and the first stage that rejects it is the one
charged with it: empty → `--min-chars` → `--max-chars` → `--max-symbol-fraction` → exact
duplicates → near-duplicates (`dedup.py`) → the `--max-tokens` cap. Lengths are counted in Unicode
code points of the normalised text. Only stages that are switched on appear in the stats, so the
manifest also records which stages ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megalite.data.errors import DataError

# Characters that are neither alphanumeric nor whitespace: `\w` is str.isalnum() plus "_".
_SYMBOL = re.compile(r"[^\w\s]|_")

# Stage names in order; the stats key of a stage is f"{name}_dropped".
STAGES = (
    "empty",
    "min_chars",
    "max_chars",
    "symbol_fraction",
    "duplicates",
    "near_duplicates",
    "max_tokens",
)


def symbol_fraction(text: str) -> float:
    """Share of the characters of `text` that are neither alphanumeric nor whitespace."""
    return _SYMBOL.subn("", text)[1] / len(text) if text else 0.0


@dataclass(frozen=True)
class QualityFilter:
    """The optional length and symbol filters; None switches a filter off."""

    min_chars: int | None = None
    max_chars: int | None = None
    max_symbol_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.min_chars is not None and self.min_chars < 0:
            raise DataError(f"--min-chars {self.min_chars} must be ≥ 0")
        if self.max_chars is not None and self.max_chars < max(1, self.min_chars or 0):
            raise DataError(f"--max-chars {self.max_chars} must be ≥ 1 and ≥ --min-chars")
        frac = self.max_symbol_fraction
        if frac is not None and not 0.0 <= frac <= 1.0:
            raise DataError(f"--max-symbol-fraction {frac} must be in [0, 1]")

    def stages(self) -> list[str]:
        """The stages this filter adds, in order."""
        on = (self.min_chars, self.max_chars, self.max_symbol_fraction)
        return [name for name, opt in zip(STAGES[1:4], on, strict=True) if opt is not None]

    def reject(self, text: str) -> str | None:
        """The stage that drops `text`, or None when it passes every filter."""
        if self.min_chars is not None and len(text) < self.min_chars:
            return "min_chars"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "max_chars"
        frac = self.max_symbol_fraction
        if frac is not None and symbol_fraction(text) > frac:
            return "symbol_fraction"
        return None


@dataclass
class PrepareStats:
    """Documents read and dropped per stage; `manifest.json` keeps `as_dict()` under "stats"."""

    input_files: int = 0
    documents_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # stage → count, stages that ran

    @classmethod
    def for_stages(cls, stages: list[str], *, input_files: int) -> PrepareStats:
        ordered = [s for s in STAGES if s in stages]
        return cls(input_files=input_files, dropped=dict.fromkeys(ordered, 0))

    def drop(self, stage: str) -> None:
        self.dropped[stage] += 1

    @property
    def kept(self) -> int:
        return self.documents_read - sum(self.dropped.values())

    def as_dict(self) -> dict[str, int]:
        out = {"input_files": self.input_files, "documents_read": self.documents_read}
        out.update({f"{stage}_dropped": n for stage, n in self.dropped.items()})
        out["documents_kept"] = self.kept
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, int]) -> PrepareStats:
        dropped = {s: int(raw[f"{s}_dropped"]) for s in STAGES if f"{s}_dropped" in raw}
        return cls(int(raw["input_files"]), int(raw["documents_read"]), dropped)
