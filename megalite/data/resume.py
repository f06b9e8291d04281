"""Resumable preparation: the hidden work folder `.prepare/` inside the output.

A preparation killed at any moment (kill -9 included) and run again with the same command ends
with a folder byte-identical to an uninterrupted run, without redoing finished work:

- after the first pass, `state.json` holds a fingerprint of the options and the inputs (resolved
  paths, sizes, mtimes), the pass's result (stats, split plan, tokenizer name and sha256), and
  `keep.bin` the per-document keep decisions as a packed bitmap; the tokenizer itself is already
  in the output folder. `state.json` is written last: without it the first pass is redone;
- during the second pass, after every shard is atomically written, `journal.json` records per
  split the shards and the writer position (documents wholly written, tokens of the straddling
  one), plus the last input document fed and the tokens fed so far (for `--max-tokens`). A re-run
  skips those documents without tokenising them; shards the journal does not list are redone.

A different fingerprint starts afresh (and says so). The folder is removed once the manifest is
written. Every file here is written atomically, so a kill never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.writer import WriterPosition
from megalite.files import atomic_write

WORK_DIR = ".prepare"
log = logging.getLogger(__name__)


def fingerprint(files: Sequence[Path], options: dict[str, Any]) -> str:
    """sha256 over the options (JSON-able, canonical) and each input's path, size and mtime."""
    inputs = []
    for path in files:
        st = path.stat()
        inputs.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    payload = json.dumps({"options": options, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Journal:
    """The second pass's progress, as of the last shard written in any split."""

    splits: dict[str, WriterPosition]
    last_doc: int = -1  # input index of the last document fed to a writer
    fed_tokens: int = 0  # tokens (EOD included) fed up to and including `last_doc`


class WorkFolder:
    """`out/.prepare/` for one fingerprint; stale contents (another fingerprint) are ignored."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.dir, self.fingerprint = out / WORK_DIR, fingerprint

    def load_first_pass(self) -> tuple[dict[str, Any], np.ndarray] | None:
        """(the saved `state`, keep flags as a bool array), or None when there is nothing to
        resume from: no state, another fingerprint, or a damaged keep bitmap."""
        raw = self._read("state.json")
        if raw is None:
            return None
        if raw.get("fingerprint") != self.fingerprint:
            log.warning("options or inputs changed since the interrupted run: starting afresh")
            return None
        try:
            packed = (self.dir / "keep.bin").read_bytes()
        except OSError:
            return None
        if hashlib.sha256(packed).hexdigest() != raw["keep_sha256"]:
            return None
        keep = np.unpackbits(np.frombuffer(packed, np.uint8), count=raw["documents"]).astype(bool)
        return raw["state"], keep

    def save_first_pass(self, state: dict[str, Any], keep: np.ndarray) -> None:
        """Persist the first pass; `state` must be JSON-able. Removes any older work first."""
        self.remove()
        self.dir.mkdir(parents=True)
        packed = np.packbits(keep.astype(bool)).tobytes()
        atomic_write(self.dir / "keep.bin", packed)
        raw = {
            "fingerprint": self.fingerprint,
            "documents": int(len(keep)),
            "keep_sha256": hashlib.sha256(packed).hexdigest(),
            "state": state,
        }
        self._write("state.json", raw)

    def load_journal(self) -> Journal | None:
        raw = self._read("journal.json")
        if raw is None or raw.get("fingerprint") != self.fingerprint:
            return None
        splits = {name: WriterPosition.from_json(p) for name, p in raw["splits"].items()}
        return Journal(splits, int(raw["last_doc"]), int(raw["fed_tokens"]))

    def save_journal(self, journal: Journal) -> None:
        raw = {
            "fingerprint": self.fingerprint,
            "last_doc": journal.last_doc,
            "fed_tokens": journal.fed_tokens,
            "splits": {name: p.to_json() for name, p in journal.splits.items()},
        }
        self._write("journal.json", raw)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            raw = json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def _write(self, name: str, raw: dict[str, Any]) -> None:
        atomic_write(self.dir / name, (json.dumps(raw, sort_keys=True) + "\n").encode())
