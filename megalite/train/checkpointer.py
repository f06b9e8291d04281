"""The run's checkpoints, as the training loop sees them: save one (committed on return, or with
`trainer.async_save` written in the background), resume from one (this layout's own, or a
layout-free one by `convert.py reshard`), take only the weights of one (`trainer.init_from`), and
name the last good one.

What is saved: the engine's state (DeepSpeed: model, optimizer, scheduler), each rank's
`rank_state` (the loop's counters, the data stream's position, the anomaly policy's state), and
`meta` (the run's description for tools: model shape, layout, TP shard specs, config). The files
and their commit are `checkpoint/training.py`'s and `checkpoint/universal.py`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalite.checkpoint import store, training, universal
from megalite.checkpoint.background import HostStaging, PendingSave
from megalite.config import Config
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import shard_specs

log = logging.getLogger("megalite")


def _all_shard_specs(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Every rank's TP shard specs merged: under a pipeline each rank holds one stage's."""
    gathered: list[dict[str, dict[str, Any]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, shard_specs(module))
    return {name: spec for specs in gathered for name, spec in sorted(specs.items())}


class Checkpointer:
    """Saves and loads through `engine`; collective: every rank calls each method at the same
    point. `last` is the newest committed checkpoint (or the one resumed from)."""

    def __init__(
        self,
        cfg: Config,
        *,
        engine: Any,
        dims: ParallelDims,
        root: Path,
        data_path: str,
        wandb_run_id: str | None = None,
    ) -> None:
        self.cfg, self.engine, self.dims, self.root = cfg, engine, dims, root
        self.wandb_run_id = wandb_run_id
        self.last: Path | None = None
        self.saved_step = -1  # the step of the newest checkpoint, committed or being written
        self.pending: PendingSave | None = None  # trainer.async_save: one in flight
        self.staging = HostStaging()  # the host copies of async saves, reused save after save
        self.save_group: dist.ProcessGroup | None = None
        if cfg.trainer.async_save:  # the background saves' collectives, apart from the loop's
            timeout = timedelta(seconds=cfg.trainer.collective_timeout)
            self.save_group = dist.new_group(backend="gloo", timeout=timeout)
        self.tp_shards = _all_shard_specs(engine.module)
        self.data_path = data_path  # recorded in the meta: the converters find the tokenizer there

    # ---- save -------------------------------------------------------------------------------

    def meta(self, consumed_tokens: int) -> dict[str, Any]:
        """The checkpoint's description, read by resume, the converters and `convert inspect`."""
        p = self.cfg.parallel
        return {
            "consumed_tokens": consumed_tokens,
            "model": asdict(self.cfg.model),
            # cp (context parallelism) only where it is > 1: a cp=1 layout is as it always was
            "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp} | ({"cp": p.cp} if p.cp > 1 else {}),
            "sequence_parallel": p.sequence_parallel,
            "tp_shards": self.tp_shards,
            "zero_stage": p.zero_stage,
            "precision": self.cfg.trainer.precision,
            "data_path": self.data_path,
            # trainer.init_from: where the weights came from (to-hf ships its tokenizer files)
            "init_from": self.cfg.trainer.init_from,
            "wandb_run_id": self.wandb_run_id,
            "config": asdict(self.cfg),
        }

    def is_saved(self, step: int) -> bool:
        """Whether `step` is already checkpointed (committed or being written) in this layout."""
        return self.saved_step == step

    def save(self, step: int, rank_state: dict[str, Any]) -> None:
        """Checkpoint `step`: committed on return, or with trainer.async_save written in the
        background (`finish` waits for it; every save, rollback and exit does)."""
        meta = self.meta(rank_state["consumed_tokens"])
        self.finish()  # one save in flight at a time
        args: dict[str, Any] = {
            "root": self.root,
            "step": step,
            "global_rank": self.dims.global_rank,
            "rank_state": rank_state,
            "meta": meta,
            "keep": self.cfg.trainer.keep_checkpoints,
        }
        if self.save_group is None:
            self._committed(training.save(self.engine, **args))
            self.saved_step = step
            return
        start = time.perf_counter()
        self.pending = training.save_async(
            self.engine, **args, group=self.save_group, staging=self.staging
        )
        self.saved_step = step  # being written
        log.info(
            "checkpoint step %d copied to host memory in %.2fs; writing it in the background",
            step,
            time.perf_counter() - start,
        )

    def finish(self) -> None:
        """Wait for the save in flight, if any (trainer.async_save); raises its CheckpointError."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._committed(pending.wait())

    def last_good(self) -> Path | None:
        """The newest committed checkpoint, once the save in flight (if any) is committed."""
        self.finish()
        return self.last

    def _committed(self, ckpt: Path) -> None:
        self.last = ckpt
        log.info("checkpoint committed: %s", ckpt)

    # ---- load -------------------------------------------------------------------------------

    def load_newest(self, candidates: list[Path]) -> dict[str, Any]:
        """The state of the first of `candidates` (newest first) whose files verify. With more
        than one (trainer.resume=auto) a damaged one is skipped, named, for the next; the last
        one's damage stops the run. Every rank reaches the same verdicts."""
        for i, ckpt in enumerate(candidates):
            try:
                training.verify_shared(ckpt)
            except store.CheckpointError as e:
                if i == len(candidates) - 1:
                    raise
                log.warning("trainer.resume=auto: skipping damaged checkpoint %s", e)
                continue
            return self.load(ckpt, verify=False)
        raise ValueError("load_newest needs at least one checkpoint")

    def load(self, ckpt: Path, *, verify: bool = True) -> dict[str, Any]:
        """Load `ckpt` into the engine and return this rank's `rank_state`; its files are
        verified first unless the caller just did (`load_newest`)."""
        layout_free = universal.is_universal(store.read_meta(ckpt))  # by `convert.py reshard`
        if layout_free:
            state = universal.load_universal(
                self.engine, ckpt, tp=self.dims.tp, tp_rank=self.dims.tp_rank, verify=verify
            )
        else:
            state = training.load(
                self.engine, ckpt, global_rank=self.dims.global_rank, verify=verify
            )
        self.last = ckpt
        # A layout-free checkpoint is not yet one of this layout: the run saves its own even
        # when it trains no step (`trainer.stop_at_step=<its step>` only rewrites it natively).
        self.saved_step = -1 if layout_free else state["step"]
        return state

    def load_weights(self, ckpt: Path) -> None:
        """Only the model weights of layout-free checkpoint `ckpt` (trainer.init_from): the run
        stays at step 0 with a fresh optimizer and schedule, and has no checkpoint of its own yet
        (`last` stays None)."""
        universal.load_weights(self.engine, ckpt, tp=self.dims.tp, tp_rank=self.dims.tp_rank)
