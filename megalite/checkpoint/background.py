"""What an asynchronous save needs (`trainer.async_save`): the state copied to host memory while
the training loop waits, and a thread that writes and commits it while training goes on.

`CapturedWrites` stands in for DeepSpeed's checkpoint engine during `save_checkpoint`: each file
DeepSpeed would write is instead copied to host memory (`HostStaging`: GPU tensors to pinned CPU
buffers, CPU tensors copied, so later steps cannot change what is saved) and kept with its path. A
`PendingSave` then runs the rest of the save in a background thread: writing those files and the
commit (see training.save_async); `wait()` returns the committed folder or raises the save's error.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


class HostStaging:
    """Host memory for the saves' copies, kept from one save to the next: the i-th storage a
    save copies goes into the i-th buffer of the previous save when the sizes agree (the state
    keeps its shapes). Fresh memory costs page faults that take longer than the copy itself
    (measured on CPU: 1.4 GB copied in 0.6-4.6 s into new memory, 0.13-0.3 s into reused), and
    on a GPU the buffers are pinned, the copies asynchronous. A buffer is overwritten only by the
    next save, which starts after the previous one's files are written (Trainer.save)."""

    def __init__(self) -> None:
        self._buffers: list[torch.UntypedStorage] = []
        self._used = 0

    def begin(self) -> None:
        """A new save: the buffers are taken from the first again."""
        self._used = 0

    def end(self) -> None:
        """Wait for the save's device-to-host copies."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def copy(self, obj: Any) -> Any:
        """`obj` (one file's state) with every tensor copied to host memory. Views of one storage
        stay views of one copied storage, as `torch.save` would have written them. Storages are
        matched by address within this call only: between two files DeepSpeed frees temporary
        clones, and the next file's may reuse the address."""
        return self._copy(obj, {})

    def _copy(self, obj: Any, copied: dict[tuple[int, str], torch.UntypedStorage]) -> Any:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), str(storage.device))
            if key not in copied:
                copied[key] = self._host(storage)
            out = torch.empty(0, dtype=obj.dtype)
            return out.set_(copied[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, dict):
            new = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict)
            new.clear()
            new.update((k, self._copy(v, copied)) for k, v in obj.items())
            return new
        if isinstance(obj, list):
            return [self._copy(v, copied) for v in obj]
        if isinstance(obj, tuple):
            items = [self._copy(v, copied) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, _IMMUTABLE):
            return obj
        try:
            return copy.deepcopy(obj)
        except Exception:  # an object that cannot be copied (a lock, a process group) is kept
            return obj

    def _host(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        """The next buffer (reused if its size fits, else new), holding a copy of `storage`."""
        nbytes, gpu = storage.nbytes(), storage.device.type == "cuda"
        if self._used < len(self._buffers) and self._buffers[self._used].nbytes() == nbytes:
            host = self._buffers[self._used]
        else:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu).untyped_storage()
            if self._used < len(self._buffers):
                self._buffers[self._used] = host
            else:
                self._buffers.append(host)
        self._used += 1
        host.copy_(storage, non_blocking=gpu)
        return host


class CapturedWrites:
    """Stands in for the engine's checkpoint engine: `save(state, path)` keeps a host copy of
    `state` (in `staging`) to be written later; everything else is the real engine's."""

    def __init__(self, inner: Any, staging: HostStaging) -> None:
        self.inner = inner
        self.staging = staging
        self.files: list[tuple[Path, Any]] = []
        self.failure: str | None = None  # of a write DeepSpeed makes itself (training.py)

    def save(self, state_dict: Any, path: str | Path) -> None:
        self.files.append((Path(path), self.staging.copy(state_dict)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class PendingSave:
    """`fn(*args)` running in a daemon thread (a process that dies does not wait for it; the
    save it leaves uncommitted is discarded by the next one)."""

    def __init__(self, fn: Callable[..., Path], *args: Any) -> None:
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, *args), name="megalite-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[..., Path], *args: Any) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # raised in the training thread by wait()
            self._error = e

    def wait(self) -> Path:
        """Block until the save is committed; its folder, or its error raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
