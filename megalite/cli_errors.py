"""Turn the errors a user can cause into one line and an exit status, instead of a traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch.multiprocessing import ProcessRaisedException

from megalite.checkpoint.store import CheckpointError
from megalite.cluster.local import RankExited
from megalite.cluster.slurm import JobFailed
from megalite.config import ConfigError
from megalite.data.errors import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Exit 2 with `error: <message>` for bad input; exit 1 naming the rank when a worker fails."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (JobFailed, RankExited) as e:  # a followed SLURM job failed; a rank died or timed out
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ProcessRaisedException as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        cause = re.sub(r"^megalite\.[\w.]+: ", "", lines[-1])  # our errors speak for themselves
        print(f"error: rank {e.error_index} failed: {cause}", file=sys.stderr)
        sys.exit(1)
