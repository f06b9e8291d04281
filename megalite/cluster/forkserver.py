"""Imported once by the process the local ranks fork from (multiprocessing's forkserver; see
`local.start_processes`): what every rank imports first, so that a rank starts in a fraction of a
second instead of importing torch afresh (about 3.5 s of CPU a rank: torch, and torch._dynamo,
which torch.optim imports at its first parameter group).

Nothing here touches a GPU: a process that initialised CUDA cannot fork ranks that use it. The
server ignores the stop signals that a shell or a job's `kill` sends to the whole process group:
were it to end, the launcher could no longer learn how its ranks ended. Each rank restores them
first thing (`local.restore_signals`).
"""

import signal

import torch  # noqa: F401
import torch._dynamo  # noqa: F401

from megalite.cluster.local import SERVER_IGNORES

for signum in SERVER_IGNORES:
    signal.signal(signum, signal.SIG_IGN)
