"""Where metrics go: one readable console line per interval, `metrics.jsonl`, wandb and, when
asked for (`logging.tensorboard=true`), TensorBoard.

Only the rank that owns the logbook (global rank 0) writes; the others get `Logbook(enabled=False)`
so call sites need no rank checks. wandb is imported lazily and runs offline by default, into
`<run_dir>/wandb/`; TensorBoard's event files go to `<run_dir>/tensorboard/`, and it is imported
only when enabled. Both get the same scalars: every number of a record but its step.

Text samples (`trainer.sample_interval`) go to `samples.jsonl`, one {"step", "prompt", "text"} a
line, and to wandb as the table `samples`, each time with every row so far (a wandb table is
replaced, not appended to, at each log).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("megalite")


def log_file(run_dir: Path, global_rank: int) -> Path:
    """The log file of one rank (every rank has one; rank 0 also logs to the console)."""
    return run_dir / "logs" / f"rank_{global_rank:05d}.log"


def format_line(record: dict[str, Any]) -> str:
    """E.g. `step 120/300 | loss 4.1234 | lr 2.950e-04 | grad 0.812 | 18.2k tok/s | mfu 31.20% |
    mem 1.20GiB`."""
    parts = [f"step {record['step']}/{record['max_steps']}", f"loss {record['loss']:.4f}"]
    parts.append(f"lr {record['lr']:.3e}")
    if record.get("grad_norm") is not None and math.isfinite(record["grad_norm"]):
        parts.append(f"grad {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
    parts.append(f"mfu {100 * record['mfu']:.2f}%")
    parts.append(f"mem {record['memory_gib']:.2f}GiB")
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']}")
    return " | ".join(parts)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record but its step, for wandb and TensorBoard: a dict value
    (tokens_per_source) becomes `key/name` series."""
    flat = {
        f"{k}/{name}" if isinstance(v, dict) else k: x
        for k, v in record.items()
        for name, x in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    return {k: v for k, v in flat.items() if isinstance(v, int | float) and k != "step"}


class Logbook:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        wandb_mode: str = "offline",
        wandb_project: str = "megalite",
        wandb_entity: str | None = None,
        wandb_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_id: str | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._metrics = None
        self._wandb = None
        self._tensorboard = None
        self._samples: list[list[Any]] = []  # every (step, prompt, text) so far: the wandb table
        if not enabled:
            return
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:  # the package's presence is checked by validate_logging, before any rank
            self._tensorboard = self._tensorboard_writer(purge_step=None)
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                mode=wandb_mode,  # type: ignore[arg-type]  # validated: offline|online|disabled
                dir=str(run_dir),
                project=wandb_project,
                entity=wandb_entity,
                name=wandb_name or run_dir.name,
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(silent=True, console="off"),
            )
            log.info("wandb %s run in %s", wandb_mode, self._wandb.dir)

    def _tensorboard_writer(self, *, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        folder = str(self.run_dir / "tensorboard")
        return SummaryWriter(log_dir=folder, flush_secs=10, purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Training goes on from `step` (a resume, a rollback): TensorBoard drops the events
        written after it by the attempt that went further, so each curve has one line.
        metrics.jsonl keeps every record (the last one of a step wins: train/curves.py); wandb
        ignores steps below its last one."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = self._tensorboard_writer(purge_step=step + 1)

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def write(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and send its numbers to wandb."""
        if self._metrics is None:  # not rank 0, or closed
            return
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        numbers = scalars(record)
        if self._wandb is not None:
            self._wandb.log(numbers, step=record["step"])
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, global_step=record["step"])

    def write_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Append the (prompt, continuation) pairs of a step to samples.jsonl and wandb."""
        if self._metrics is None:  # not rank 0, or closed
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for prompt, text in samples:
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
        self._samples += [[step, prompt, text] for prompt, text in samples]
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "text"], data=self._samples)
            self._wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
