"""A run's curves from its `metrics.jsonl`: loss, validation loss, LR, grad norm and tokens/s in
one PNG, several runs overlaid, and a table of where each run ended (`tools/plot.py`, also
installed as `megalite-plot`).

The file is read as the logbook writes it: training records carry `loss`, eval records
`val_loss`, others (memory checks) are ignored. A run resumed in its folder appends, so a step
may appear again after a rollback or a resume: the last occurrence in file order wins. A run still
being written may end in a partial line, dropped with a warning. A Hydra multirun folder (`0/`,
`1/`, … each a run) expands to its runs, labelled by the overrides that differ between them.

matplotlib is imported only when a picture is drawn: it takes about a second to load.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PANELS = (  # (record key, axis title); the first panel also draws val_loss
    ("loss", "loss (train: line, validation: dots)"),
    ("lr", "learning rate"),
    ("grad_norm", "grad norm"),
    ("tokens_per_s", "tokens/s"),
)


class CurvesError(ValueError):
    """Bad input, said in one line (the CLI prints it and exits 2)."""


@dataclass
class Run:
    name: str
    folder: Path
    train: list[dict[str, Any]]  # by step, one record per step
    evals: list[dict[str, Any]]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of `path` in file order. An unreadable last line is a write in progress
    (or cut short by a kill) and an unreadable earlier one a cut write a resume appended to:
    both are dropped with a warning, never fatal."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "ends in a partial line" if number == len(lines) else f"line {number} is cut"
            warn(f"{path} {where} (a run still being written, or killed mid-write): ignored")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def last_per_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one in file order (a rollback or a resume logs a step
    again), sorted by step."""
    by_step = {int(r["step"]): r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def load_run(folder: Path, name: str) -> Run:
    """The run in `folder`; CurvesError when it holds no metrics.jsonl or no training record."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise CurvesError(f"{folder}: no metrics.jsonl ({describe(folder)})")
    records = read_records(path)
    train = last_per_step(r for r in records if "loss" in r)
    if not train:
        raise CurvesError(f"{path}: no training record (a record with 'loss') among {len(records)}")
    return Run(name, folder, train, last_per_step(r for r in records if "val_loss" in r))


def describe(folder: Path) -> str:
    """What a folder holds instead of a run, for the error line."""
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "the folder is empty"
    shown = ", ".join(names[:8]) + (f", … ({len(names)} entries)" if len(names) > 8 else "")
    return f"it holds {shown}"


def sweep_members(folder: Path) -> list[Path]:
    """The job folders of a Hydra multirun (`0/`, `1/`, …) in job order; [] when `folder` is not
    one. A job without metrics.jsonl yet (not started, or starting) is skipped with a warning."""
    if (folder / "metrics.jsonl").exists() or not folder.is_dir():
        return []
    jobs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=_job)
    runs = [p for p in jobs if (p / "metrics.jsonl").is_file()]
    if runs:
        for p in sorted(set(jobs) - set(runs), key=_job):
            warn(f"{p}: no metrics.jsonl yet ({describe(p)}): skipped")
    return runs


def _job(path: Path) -> int:
    return int(path.name)


def overrides(path: Path, key: str | None = None) -> list[str]:
    """The overrides of a YAML list (a job's `.hydra/overrides.yaml`), or under `key` of a YAML
    mapping (`hydra.overrides.task` of a sweep's `multirun.yaml`); [] without one."""
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    node = OmegaConf.select(node, key, default=[]) if key else node
    return [str(o) for o in node]


def sweep_labels(jobs: Sequence[Path]) -> list[str]:
    """Each job's overrides less the fixed ones (`model=tiny` says nothing in a legend): those the
    sweep's multirun.yaml gives as they are (not a sweep like `optim.lr=1e-3,3e-3`) and those
    all jobs share; the folder's name where no overrides are recorded."""
    given = [overrides(job / ".hydra" / "overrides.yaml") for job in jobs]
    fixed = set(overrides(jobs[0].parent / "multirun.yaml", "hydra.overrides.task"))
    if len(given) > 1:
        fixed |= set.intersection(*(set(o) for o in given))
    labels = [" ".join(o for o in own if o not in fixed) for own in given]
    return [
        label or f"{job.parent.name}/{job.name}" for label, job in zip(labels, jobs, strict=True)
    ]


def load_runs(folders: Sequence[Path]) -> list[Run]:
    """Each folder's run, or the runs of a multirun folder."""
    runs = []
    for folder in folders:
        if folder.name == "metrics.jsonl" and folder.is_file():  # the file itself was named
            folder = folder.parent
        jobs = sweep_members(folder)
        if jobs:
            runs += [
                load_run(job, label) for job, label in zip(jobs, sweep_labels(jobs), strict=True)
            ]
        else:
            runs.append(load_run(folder, folder.resolve().name or str(folder)))
    return runs


# ---- the table ---------------------------------------------------------------------------------


def summary(run: Run) -> dict[str, str]:
    """One row: steps, tokens, final train loss, final and best validation loss."""
    last = run.train[-1]
    row = {"run": run.name, "steps": str(last["step"]), "tokens": f"{last.get('tokens', 0):,}"}
    row["train loss"] = f"{last['loss']:.4f}"
    row["val loss"] = row["best val (step)"] = "-"
    evals = [r for r in run.evals if math.isfinite(r["val_loss"])]
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        row["val loss"] = f"{evals[-1]['val_loss']:.4f}"
        row["best val (step)"] = f"{best['val_loss']:.4f} ({best['step']})"
    return row


def table(runs: Sequence[Run]) -> str:
    """The rows aligned under their headers: text left, numbers right."""
    rows = [summary(run) for run in runs]
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line([r[h] for h in headers]) for r in rows)])


# ---- the picture -------------------------------------------------------------------------------


def series(records: Sequence[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records holding a finite `key` (grad_norm is NaN on some steps)."""
    points = [
        (float(r.get(x, 0)), float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: Sequence[Run], out: Path, *, x: str = "step") -> None:
    """The four panels (loss and validation loss, LR, grad norm, tokens/s) against `x` (step or
    tokens), one colour per run, saved as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for ax, (key, _) in zip(axes.flat, PANELS, strict=True):
            ax.plot(*series(run.train, key, x), color=color, label=run.name, linewidth=1.2)
        val_x, val_y = series(run.evals, "val_loss", x)
        axes[0, 0].plot(val_x, val_y, "o--", color=color, markersize=4, linewidth=1)
    for ax, (_, title) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(x)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(", ".join(run.name for run in runs) if len(runs) <= 3 else f"{len(runs)} runs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---- the CLI -----------------------------------------------------------------------------------


def default_out(folders: Sequence[Path]) -> Path:
    """`curves.png` in the run (or multirun) folder when one is named, else in the current one."""
    if len(folders) == 1 and folders[0].is_dir():
        return folders[0] / "curves.png"
    return Path("curves.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot runs' loss curves; print where they ended.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run or multirun")
    parser.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/curves.png)")
    parser.add_argument("--x", choices=["step", "tokens"], default="step")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except CurvesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or default_out(args.runs)
    plot(runs, out, x=args.x)
    print(table(runs))
    print(f"curves: {out}")
    return 0
