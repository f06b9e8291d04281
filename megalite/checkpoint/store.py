"""Checkpoint folders: atomic commit, the `latest` pointer, metadata, verification and pruning.

Layout of a run's `checkpoints/` folder:

    checkpoints/
      step_00000100/            one committed checkpoint
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed's files)
        rank_00000.pt ...       per-rank state: data stream, RNG
        meta.json               written last: step, tokens, layout, config, each file's size and
                                CRC-32, and `previous` (the checkpoint `latest` named before)
      latest                    the name of the newest committed checkpoint

A checkpoint is written under `.tmp-step_...`, fsynced, renamed, and only then `latest` is
rewritten (itself by write-to-temp + rename). A crash at any moment therefore leaves the previous
checkpoint untouched; a folder without `meta.json` is never loaded. A crash after the rename but
before `latest` is rewritten leaves a newer whole checkpoint that `latest` does not name yet: its
meta.json says `previous` = the one `latest` names, and `latest()` follows that link, so the newest
*committed* checkpoint wins (a rollback — a run resumed from an older checkpoint — still wins over
the abandoned newer steps, since its commit names them as `previous`, not the reverse).

Pruning (`trainer.keep_checkpoints`) renames a folder to `.trash-step_...` before deleting it, so
a half-deleted folder never looks like a checkpoint; `discard_partial` removes `.tmp-` and
`.trash-` leftovers at the next save.

Checksums: CRC-32 (zlib.crc32 over 1 MiB chunks: about 3 GiB/s per core from the page cache,
which still holds the files right after a save; BLAKE2b ran at 0.8, SHA-256 at 1.7 on the same
core). It detects damage, not tampering. `read_meta` checks sizes only (cheap: for tools and the
launcher's pre-start check); `verify` also checks the checksums, in one process; training.py splits
that work over the ranks, at save and at load. Meta of older checkpoints records a size (an int)
per file and no checksum: those still load, size-checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megalite import faults
from megalite.files import atomic_write, fsync_path

META = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
CHUNK = 1 << 20  # bytes read at a time when hashing
log = logging.getLogger("megalite")
STEP_FOLDER = re.compile(r"step_(\d+)(?:\.(\d+))?")  # step_00000100, or step_00000100.1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the folder and what is wrong."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_name(step: int) -> str:
    return TMP_PREFIX + step_name(step)


def rank_file(global_rank: int) -> str:
    return f"rank_{global_rank:05d}.pt"


# ---- files and checksums ----------------------------------------------------------------------


def list_files(folder: Path) -> list[str]:
    """Every file under `folder` but meta.json, as sorted relative paths: the order in which the
    ranks split hashing (rank r takes indices r, r + world, ...)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META
    )


def file_entry(path: Path, *, fsync: bool = False) -> dict[str, Any]:
    """meta.json's record of one file: {"size": bytes, "crc32": 8 hex digits}. With `fsync`, the
    file is also flushed to disk (the committing ranks share the fsyncs with the hashing)."""
    crc, size = 0, 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def file_size(entry: int | dict[str, Any]) -> int:
    """The size a meta.json entry records (older checkpoints record only the size, an int)."""
    return entry if isinstance(entry, int) else entry["size"]


def file_problem(
    ckpt: Path, rel: str, entry: int | dict[str, Any], *, checksum: bool
) -> str | None:
    """What is wrong with file `rel` of `ckpt` against its meta.json entry, or None if nothing:
    missing, another size, or (with `checksum`, where one was recorded) other contents."""
    path = ckpt / rel
    if not path.is_file():
        return f"missing file {rel}"
    size, want = path.stat().st_size, file_size(entry)
    if size != want:
        return f"file {rel} has {size} bytes, {want} were saved"
    if checksum and isinstance(entry, dict) and "crc32" in entry:
        got = file_entry(path)["crc32"]
        if got != entry["crc32"]:
            return f"file {rel} is damaged: CRC-32 {got}, {entry['crc32']} at save"
    return None


def first_problem(
    ckpt: Path, files: dict[str, Any], *, part: int = 0, parts: int = 1, checksum: bool = True
) -> str | None:
    """The first problem among the files with index ≡ `part` (mod `parts`) of the sorted names
    in meta.json's `files`; None if they are all whole."""
    for rel in sorted(files)[part::parts]:
        problem = file_problem(ckpt, rel, files[rel], checksum=checksum)
        if problem is not None:
            return problem
    return None


# ---- commit -----------------------------------------------------------------------------------


def commit(
    root: Path, step: int, meta: dict[str, Any], *, files: dict[str, Any] | None = None
) -> Path:
    """Seal `root/.tmp-step_N` (all ranks have written into it): record each file's size and
    CRC-32 in meta.json, fsync, rename to `step_N`, then point `latest` at it. Run by one rank.

    `files`: the entries the ranks computed (and fsynced) in parallel; a file they missed is
    hashed here. On an OSError after the rename the folder is renamed back to `.tmp-step_N`, so
    the caller's error handling sees the same state as for an error before it."""
    tmp = root / tmp_name(step)
    entries = dict(files or {})
    for rel in list_files(tmp):
        if rel not in entries:
            entries[rel] = file_entry(tmp / rel, fsync=True)
    previous = latest(root)
    meta = {
        **meta,
        "step": step,
        "files": entries,
        "previous": previous.name if previous else None,
    }
    atomic_write(tmp / META, json.dumps(meta, indent=2, sort_keys=True))
    for folder in (p for p in tmp.rglob("*") if p.is_dir()):
        fsync_path(folder)
    faults.point("before_rename", step=step)
    final = _free_name(root, step)
    os.rename(tmp, final)
    try:
        fsync_path(root)
        faults.point("after_rename_before_latest", step=step)
        atomic_write(root / LATEST, final.name + "\n")
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(final, tmp)
        raise
    return final


def _free_name(root: Path, step: int) -> Path:
    """`step_N`, or `step_N.K` when step N was already committed (a run resumed from an older
    checkpoint passes the same step again): nothing committed is ever deleted or overwritten."""
    path, k = root / step_name(step), 1
    while path.exists():
        path, k = root / f"{step_name(step)}.{k}", k + 1
    return path


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """Write a tool's output folder under a temporary name beside `dst` and rename it into place
    (fsynced first) only if the block succeeds; on any error the partial folder is removed."""
    if dst.exists():
        raise CheckpointError(f"{dst} exists: choose a new destination")
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):
        fsync_path(path)
    fsync_path(tmp)
    os.rename(tmp, dst)
    fsync_path(dst.parent)


def discard_partial(root: Path) -> None:
    """Remove folders left by saves that never committed and by interrupted pruning."""
    if root.is_dir():
        for prefix in (TMP_PREFIX, TRASH_PREFIX):
            for path in root.glob(prefix + "*"):
                shutil.rmtree(path, ignore_errors=True)


# ---- finding checkpoints ----------------------------------------------------------------------


def _order(path: Path) -> tuple[int, int]:
    """(step, K) of a `step_N[.K]` folder, the order of `committed` and pruning."""
    m = STEP_FOLDER.fullmatch(path.name)
    return (int(m[1]), int(m[2] or 0)) if m else (-1, 0)


def committed(root: Path) -> list[Path]:
    """Every committed `step_*` folder under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / META).is_file()]
    return sorted(found, key=_order)


def _successors(root: Path) -> dict[str | None, list[Path]]:
    """Committed folders by the `previous` their meta.json names (None: the run's first)."""
    out: dict[str | None, list[Path]] = {}
    for path in committed(root):
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            continue  # unreadable meta: never a candidate
        if "previous" in meta:  # older checkpoints have no link
            out.setdefault(meta["previous"], []).append(path)
    return out


def latest(root: Path) -> Path | None:
    """The newest committed checkpoint under `root`, or None if there is none: the one `latest`
    names, or one committed after it whose `latest` update a crash prevented (module docstring)."""
    pointer = root / LATEST
    head = None
    if pointer.is_file():
        head = root / pointer.read_text().strip()
        if not (head / META).is_file():
            return None
    successors, seen = _successors(root), set()
    name = head.name if head else None
    while name in successors and name not in seen:
        seen.add(name)
        head = max(successors[name], key=_order)
        name = head.name
    return head


def lineage(root: Path) -> list[Path]:
    """The committed checkpoints under `root`, newest commit first: `latest()`, then each one's
    `previous` in turn. Where a meta.json cannot be read, or has no link (an older checkpoint),
    the next is the newest committed older step."""
    out: list[Path] = []
    head = latest(root)
    while head is not None and head not in out:
        out.append(head)
        try:
            link = json.loads((head / META).read_text()).get("previous", "")
        except (OSError, ValueError):
            link = ""
        if link:
            head = root / link if (root / link / META).is_file() else None
        elif link is None:  # the run's first checkpoint
            head = None
        else:
            older = [p for p in committed(root) if _order(p)[0] < _order(head)[0]]
            head = older[-1] if older else None
    return out


def resume_candidates(root: Path) -> list[Path]:
    """`trainer.resume=auto`: the `lineage` whose files are all there at their recorded sizes,
    newest first (empty: none was committed); each one left out is logged with the reason, and
    when every one is, the newest's problem is raised. The ranks then load the first whose
    checksums verify (Trainer.resume_newest)."""
    found, problems = [], []
    for ckpt in lineage(root):
        try:
            read_meta(ckpt)
        except CheckpointError as e:
            log.warning("trainer.resume=auto: skipping damaged checkpoint %s", e)
            problems.append(e)
            continue
        found.append(ckpt)
    if problems and not found:
        raise problems[0]
    return found


def resolve(resume: str, *, run_dir: Path) -> Path | None:
    """Turn `trainer.resume` into a checkpoint folder.

    `auto` → the run's latest checkpoint, or None for a fresh start. A path may name a checkpoint
    folder or a `checkpoints/` folder (its latest) or a run folder (its latest).
    """
    if resume == "auto":
        return latest(run_dir / "checkpoints")
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"trainer.resume={resume}: no such checkpoint folder")
    for candidate in (path, path / "checkpoints"):
        if (candidate / META).is_file():
            return candidate
        found = latest(candidate)
        if found is not None:
            return found
    raise CheckpointError(
        f"trainer.resume={resume}: not a committed checkpoint (no {META}; an interrupted save?)"
    )


# ---- pruning ----------------------------------------------------------------------------------


def prune(root: Path, *, keep: int) -> list[str]:
    """Delete the oldest committed checkpoints beyond the newest `keep` (0: keep all), never the
    one `latest()` resolves to; returns the names deleted. Call only after a commit. Each folder
    is renamed to `.trash-<name>` first, so a crash here leaves whole checkpoints and garbage."""
    if keep <= 0:
        return []
    head = latest(root)
    victims = [p for p in committed(root)[:-keep] if p != head]
    for path in victims:
        trash = root / (TRASH_PREFIX + path.name)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        fsync_path(root)
        faults.point("during_prune", step=_order(head)[0] if head else -1)
        shutil.rmtree(trash)
    return [p.name for p in victims]


# ---- reading ----------------------------------------------------------------------------------


def read_meta(ckpt: Path) -> dict[str, Any]:
    """Metadata of a committed checkpoint, after checking every recorded file exists with its
    recorded size (cheap; `verify` also compares contents)."""
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: not a committed checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: {META} cannot be read ({e})") from e
    problem = first_problem(ckpt, meta["files"], checksum=False)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}")
    return meta


def verify(ckpt: Path) -> dict[str, Any]:
    """`read_meta`, then every file's CRC-32 against meta.json, in this process (for tools; a
    training run splits this over its ranks, see training.verify_shared)."""
    meta = read_meta(ckpt)
    problem = first_problem(ckpt, meta["files"])
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}")
    return meta


_LAYOUT_DEFAULTS = {"cp": 1}  # what a layout that does not name an axis means


def _degree(layout: dict[str, int], axis: str) -> int | None:
    return layout.get(axis, _LAYOUT_DEFAULTS.get(axis))


def check_compatible(
    meta: dict[str, Any], *, model: dict[str, Any], layout: dict[str, int]
) -> None:
    """Refuse a checkpoint of another model shape or parallel layout, naming the difference."""
    saved_model = meta["model"]
    diffs = [
        f"{k}={saved_model.get(k)} (config {v})"
        for k, v in sorted(model.items())
        if k != "name" and saved_model.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {meta.get('path', '')} is of another model shape: "
            + ", ".join(diffs)
            + "; use the matching model preset"
        )
    saved_layout = meta["layout"]
    # A layout names cp only where it is > 1. A change of cp is refused for now: cp shards no
    # weight, but ZeRO's partitions (and DeepSpeed's files) are over dp x cp.
    if any(_degree(saved_layout, k) != _degree(layout, k) for k in {*layout, *_LAYOUT_DEFAULTS}):
        raise CheckpointError(
            f"checkpoint layout {saved_layout} differs from this run's {layout}: "
            "convert it with `python tools/convert.py reshard` or run with the saved layout"
        )
