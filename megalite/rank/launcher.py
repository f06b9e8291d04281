"""What a rank knows of the launcher that started it: whether it is one of megalite's own local
ranks (`cluster/local.py`), and how it leaves the launcher a line on why it ended itself."""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_CHILD = "MEGALITE_LOCAL_CHILD"  # "1" in a rank megalite's local launcher started
FAILURE_DIR = "MEGALITE_FAILURE_DIR"  # where such a rank leaves its reason (`report_failure`)
STARTUP_EXIT = 3  # a rank's start-up phase ran past trainer.startup_timeout (train/watchdog.py)


def local_child() -> bool:
    """True in a rank megalite's local launcher started (not one of srun's or torchrun's)."""
    return os.environ.get(LOCAL_CHILD) == "1"


def report_failure(message: str) -> None:
    """Leave `message` for the launcher that started this rank, if it is megalite's own (srun's
    and torchrun's ranks say it on stderr and in their logs)."""
    folder = os.environ.get(FAILURE_DIR)
    if folder:
        rank = os.environ.get("RANK", "0")
        (Path(folder) / f"rank_{int(rank):05d}.txt").write_text(message)
