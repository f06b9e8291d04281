"""The training loop: steps, evaluation, logging and checkpoints around a DeepSpeed engine.

One `Trainer` per process. Every rank runs the same loop; collective calls (all-reduce of the loss,
checkpoint save/load) happen at the same points on every rank, and only global rank 0 writes logs
and metrics. The step is the optimizer step: each consumes `grad_accum_steps` micro-batches per
data-parallel rank, i.e. `global_batch_size` sequences in all.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalite import faults
from megalite.checkpoint import store, training, universal
from megalite.checkpoint.background import HostStaging, PendingSave
from megalite.cluster.signals import StopRequest, signal_name
from megalite.config import Config
from megalite.data.loader import Loader
from megalite.data.mixture import configured_sources
from megalite.data.shards import Retry
from megalite.data.stream import TokenStream
from megalite.model.flops import flops_per_token
from megalite.model.llama import cross_entropy
from megalite.parallel.dims import ParallelDims
from megalite.parallel.discard import discarded_update, judge_before_step
from megalite.parallel.engine import megalite_clips
from megalite.parallel.parallelize import LossFn, shard_specs
from megalite.train import metrics
from megalite.train.anomaly import LossGuard
from megalite.train.logbook import Logbook, format_line, log_file
from megalite.train.memory_check import MemoryCheck
from megalite.train.watchdog import HangWatchdog

log = logging.getLogger("megalite")


class TrainingError(RuntimeError):
    """Training cannot go on (a loss anomaly); the message names the last good checkpoint."""


class Anomaly(Exception):
    """A step's loss is non-finite or a spike; `windows` are its batch's global windows."""

    def __init__(self, reason: str, step: int, windows: range) -> None:
        super().__init__(reason)
        self.reason, self.step, self.windows = reason, step, windows

    def __str__(self) -> str:
        w = self.windows
        return f"{self.reason} at step {self.step} (windows [{w.start}, {w.stop}))"


def _all_shard_specs(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Every rank's TP shard specs merged: under a pipeline each rank holds one stage's."""
    gathered: list[dict[str, dict[str, Any]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, shard_specs(module))
    return {name: spec for specs in gathered for name, spec in sorted(specs.items())}


def pairs(batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of each (b, s + 1) window batch, as the pipeline engine loads them."""
    for batch in batches:
        yield batch[:, :-1], batch[:, 1:]  # (b, s), (b, s)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: Any,
        scheduler: Any,
        dims: ParallelDims,
        device: torch.device,
        run_dir: Path,
        logbook: Logbook,
        loss_fn: LossFn = cross_entropy,
        stop: StopRequest | None = None,
        memory_check: MemoryCheck | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.memory_check = memory_check  # the plan beside the measured peak, after one step
        self.loss_fn = loss_fn
        self.engine = engine
        self.scheduler = scheduler
        self.dims = dims
        self.device = device
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints"
        self.log_file = log_file(run_dir, dims.global_rank)
        self.logbook = logbook
        t = cfg.trainer
        self.sources = configured_sources(cfg.data)
        self.train_data = Loader(
            self._stream("train", shuffle=cfg.data.shuffle),
            workers=cfg.data.workers,
            prefetch=cfg.data.prefetch,
            pin_memory=device.type == "cuda",
        )
        self._batches = iter(self.train_data)
        self._pairs = pairs(self._batches)
        self.step = 0
        self.consumed_tokens = 0
        self.initial_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.saved_step = -1  # the step of the newest checkpoint, committed or being written
        self.pending_save: PendingSave | None = None  # trainer.async_save: one in flight
        self.save_group = None
        self.staging = HostStaging()  # the host copies of async saves, reused save after save
        if t.async_save:  # the background saves' collectives, apart from the training loop's
            timeout = timedelta(seconds=t.collective_timeout)
            self.save_group = dist.new_group(backend="gloo", timeout=timeout)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = metrics.peak_flops(
            device, precision=t.precision, configured=t.peak_flops, cpu_peak=t.cpu_peak_flops
        )
        self.guard = LossGuard(spike_factor=t.spike_factor)
        self.skipped: list[list[int]] = []  # [start, stop) windows skipped after a rollback
        self.rollbacks = 0
        self.skips_in_a_row = 0
        self._verdict: tuple[float, Anomaly | None] | None = None  # the step in progress's
        self._first_window = 0  # the step in progress's first global window
        self.clip_here = megalite_clips(cfg)
        self.tp_shards = _all_shard_specs(self.engine.module)
        self.pipeline = cfg.parallel.pp > 1
        if self.pipeline:
            judge_before_step(self.engine, self._judge)

    def _stream(self, split: str, *, shuffle: bool) -> functools.partial[TokenStream]:
        """A factory of this rank's stream of `split` (picklable, for loader workers)."""
        t, d = self.cfg.trainer, self.cfg.data
        return functools.partial(
            TokenStream,
            self.sources,
            split,
            seq_len=t.seq_len,
            micro_batch_size=t.micro_batch_size,
            dp_rank=self.dims.dp_rank,
            dp_size=self.dims.dp,
            seed=t.seed,
            shuffle=shuffle,
            retry=Retry(attempts=d.read_attempts, delay_s=d.retry_delay_s),
        )

    # ---- state ----------------------------------------------------------------------------

    def resume_newest(self, candidates: list[Path]) -> None:
        """Resume from the first of `candidates` (newest first) whose files verify. With more
        than one (trainer.resume=auto) a damaged one is skipped, named, for the next; the last
        one's damage stops the run. Collective: every rank reaches the same verdicts."""
        for i, ckpt in enumerate(candidates):
            try:
                training.verify_shared(ckpt)
            except store.CheckpointError as e:
                if i == len(candidates) - 1:
                    raise
                log.warning("trainer.resume=auto: skipping damaged checkpoint %s", e)
                continue
            self.resume(ckpt, verify=False)
            return

    def resume(self, ckpt: Path, *, verify: bool = True) -> None:
        """Restore the training state of `ckpt`, its files verified first unless the caller just
        did (`resume_newest`). Collective."""
        layout_free = universal.is_universal(store.read_meta(ckpt))  # by `convert.py reshard`
        if layout_free:
            state = universal.load_universal(
                self.engine, ckpt, tp=self.dims.tp, tp_rank=self.dims.tp_rank, verify=verify
            )
        else:
            state = training.load(
                self.engine, ckpt, global_rank=self.dims.global_rank, verify=verify
            )
        self.step = state["step"]
        self.consumed_tokens = state["consumed_tokens"]
        self.initial_val_loss = state.get("initial_val_loss")
        if state["data"] is not None:  # None: imported weights, the stream starts afresh
            self.train_data.load_state_dict(state["data"])
        anomaly = state.get("anomaly") or {}
        self.guard.load_state_dict(anomaly.get("guard", {}))
        saved = [list(r) for r in anomaly.get("skipped", [])]  # a rollback's own range is newer
        self.skipped = sorted(saved + [r for r in self.skipped if r not in saved])
        self._batches = iter(self.train_data)
        self._pairs = pairs(self._batches)
        self.last_checkpoint = ckpt
        # A layout-free checkpoint is not yet one of this layout: the run saves its own even
        # when it trains no step (`trainer.stop_at_step=<its step>` only rewrites it natively).
        self.saved_step = -1 if layout_free else self.step
        log.info(
            "resumed from %s at step %d (%d tokens seen)", ckpt, self.step, self.consumed_tokens
        )

    def save(self) -> None:
        """Checkpoint this step: committed on return, or with trainer.async_save written in the
        background (`finish_save` waits for it; every save, rollback and exit does)."""
        rank_state = {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "initial_val_loss": self.initial_val_loss,
            "data": self.train_data.state_dict(),
            "anomaly": {"guard": self.guard.state_dict(), "skipped": self.skipped},
        }
        p = self.cfg.parallel
        meta = {
            "consumed_tokens": self.consumed_tokens,
            "model": asdict(self.cfg.model),
            "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp},
            "sequence_parallel": p.sequence_parallel,
            "tp_shards": self.tp_shards,
            "zero_stage": p.zero_stage,
            "precision": self.cfg.trainer.precision,
            "data_path": self.sources[0].path,
            "wandb_run_id": self.logbook.wandb_run_id,
            "config": asdict(self.cfg),
        }
        self.finish_save()  # one save in flight at a time
        args = {
            "root": self.ckpt_root,
            "step": self.step,
            "global_rank": self.dims.global_rank,
            "rank_state": rank_state,
            "meta": meta,
            "keep": self.cfg.trainer.keep_checkpoints,
        }
        if self.save_group is None:
            self._committed(training.save(self.engine, **args))
            self.saved_step = self.step
            return
        start = time.perf_counter()
        self.pending_save = training.save_async(
            self.engine, **args, group=self.save_group, staging=self.staging
        )
        self.saved_step = self.step  # being written
        log.info(
            "checkpoint step %d copied to host memory in %.2fs; writing it in the background",
            self.step,
            time.perf_counter() - start,
        )

    def finish_save(self) -> None:
        """Wait for the save in flight, if any (trainer.async_save); raises its CheckpointError."""
        if self.pending_save is not None:
            pending, self.pending_save = self.pending_save, None
            self._committed(pending.wait())

    def _committed(self, ckpt: Path) -> None:
        self.last_checkpoint = ckpt
        log.info("checkpoint committed: %s", ckpt)

    # ---- steps ----------------------------------------------------------------------------

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().to(torch.float64)
        dist.all_reduce(value, group=self.dims.group("dp"))
        return value.item() / self.dims.dp

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns loss, lr, grad norm.
        The loss is judged before the optimizer step (`_judge`): an anomalous step's update is
        dropped and `Anomaly` raised (see anomaly.py and parallel/discard.py)."""
        lr = self.scheduler.get_last_lr()[0]
        self._first_window = first = self.train_data.position
        self._verdict = None
        if self.pipeline:
            # The pipeline engine runs the 1F1B schedule over all micro-batches and judges the
            # loss before its optimizer step (see __init__); only the first and last stages draw
            # from the stream, the others move past the step's windows unread.
            self.engine.train_batch(self._pairs)
            if self.train_data.position == first:
                self._move_past(self.cfg.trainer.global_batch_size)
            grad_norm = self.engine.get_global_grad_norm()
        else:
            grad_norm = self._accumulate(self.cfg.grad_accum_steps)
        assert self._verdict is not None, "the optimizer step was not judged"
        loss_value, anomaly = self._verdict
        self.step += 1
        self.consumed_tokens += self.tokens_per_step
        if anomaly is not None:
            raise anomaly
        self.skips_in_a_row = 0
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        return {"loss": loss_value, "lr": lr, "grad_norm": norm}

    def _judge(self, loss: float) -> bool:
        """The loss of the step in progress, before its optimizer step: True (drop the update)
        if it is non-finite or a spike. The same loss, hence verdict, on every rank."""
        windows = range(self._first_window, self._first_window + self.cfg.trainer.global_batch_size)
        loss = faults.bad_loss(loss, windows=windows)  # tests only
        reason = self.guard.check(loss)
        anomaly = None if reason is None else Anomaly(reason, self.step + 1, windows)
        self._verdict = (loss, anomaly)
        return anomaly is not None

    def _accumulate(self, accum: int) -> float | None:
        """Forward/backward over `accum` micro-batches, the loss judged, and the optimizer step
        (no pipeline); returns the gradient norm."""
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for micro in range(accum):
            batch = next(self._batches).to(self.device, non_blocking=True)  # (b, s + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (b, s), (b, s)
            loss = self.loss_fn(self.engine(inputs), targets)
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < accum - 1:
                self.engine.step()  # no update before the accumulation boundary
                continue
            if self._judge(self._dp_mean(loss_sum / accum)):
                with discarded_update(self.engine):
                    self.engine.step()
                return None
            if self.clip_here:
                grad_norm = self._clip_gradients()
            self.engine.step()
        return grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()

    def _clip_gradients(self) -> float:
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return float(clip_grad_norm_(params, max_norm, mpu=self.engine.mpu))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_steps` micro-batches of each rank's val stream."""
        t = self.cfg.trainer
        stream = self._stream("val", shuffle=False)()
        if self.pipeline:  # averaged over micro-batches and DP, broadcast to every stage
            loss = self.engine.eval_batch(pairs(stream), num_micro_batches=t.eval_steps)
            return float(loss)
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for _, batch in zip(range(t.eval_steps), stream, strict=False):
            batch = batch.to(self.device)
            total += self.loss_fn(self.engine(batch[:, :-1]), batch[:, 1:]).float()
        self.engine.train()
        return self._dp_mean(total / t.eval_steps)

    # ---- the loop -------------------------------------------------------------------------

    def _log_eval(self, val_loss: float) -> None:
        ppl = math.exp(min(val_loss, 50.0))
        seen = {  # the realised mixture: training tokens drawn from each source so far
            name: windows * self.cfg.trainer.seq_len
            for name, windows in self.train_data.stream.windows_drawn().items()
        }
        mix = ""
        if len(seen) > 1:
            total = max(sum(seen.values()), 1)
            mix = " | mix " + " ".join(f"{k} {100 * v / total:.1f}%" for k, v in seen.items())
        log.info("step %d | val_loss %.4f | val_ppl %.2f%s", self.step, val_loss, ppl, mix)
        self.logbook.write(
            {
                "step": self.step,
                "val_loss": val_loss,
                "val_ppl": ppl,
                "tokens": self.consumed_tokens,
                "tokens_per_source": seen,
            }
        )

    def fit(self) -> dict[str, Any]:
        """Train to `trainer.max_steps`; returns the final validation loss and perplexity, or
        {"stopped_by": signal name, "step": N} when a stop request ended the run early."""
        t = self.cfg.trainer
        if self.step == 0:
            self.initial_val_loss = self.evaluate()
            self._log_eval(self.initial_val_loss)
        last = t.max_steps if t.stop_at_step is None else min(t.max_steps, t.stop_at_step)
        watchdog = HangWatchdog(self.log_file, timeout_s=t.hang_timeout)
        try:
            result = self._loop(last, watchdog)
            self.finish_save()  # nothing left half-written at a clean exit
            return result
        finally:
            watchdog.close()

    def _check_memory(self) -> None:
        if self.memory_check is not None:
            record = self.memory_check.after_step(self.step)
            if record is not None:
                self.logbook.write(record)

    def _loop(self, last: int, watchdog: HangWatchdog) -> dict[str, Any]:
        t = self.cfg.trainer
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        while self.step < last:
            watchdog.arm()
            self._skip_bad_batch()
            try:
                window.append(self.train_step())
                self._check_memory()
            except Anomaly as bad:
                if t.anomaly != "skip":
                    self._on_anomaly(bad)  # a rollback continues from the checkpoint's step
                    continue
                self._skip_update(bad)
                window.append({"skipped": 1.0})
            if t.log_interval and (self.step % t.log_interval == 0 or self.step == last):
                self._log_train(window, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < last:
                self._log_eval(self.evaluate())
            if t.save_interval and self.step % t.save_interval == 0:
                self.save()
            if self.stop is not None and (signum := self.stop.agreed(self.device)):
                return self._stop_on(signum)
        val_loss = self.evaluate()
        self._log_eval(val_loss)
        if self.saved_step != self.step:
            self.save()
        result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.step < t.max_steps:
            log.info(
                "stopped at step %d (trainer.stop_at_step; the schedule runs to max_steps=%d): "
                "resume with trainer.resume=auto",
                self.step,
                t.max_steps,
            )
        elif self.initial_val_loss is not None:
            log.info(
                "final validation loss %.4f (perplexity %.2f); untrained %.4f (perplexity %.2f)",
                val_loss,
                result["val_ppl"],
                self.initial_val_loss,
                math.exp(min(self.initial_val_loss, 50.0)),
            )
        return result

    def _skip_update(self, bad: Anomaly) -> None:
        """trainer.anomaly=skip: the step's update was dropped; halt after max_skips in a row."""
        self.skips_in_a_row += 1
        limit = self.cfg.trainer.max_skips
        if self.skips_in_a_row > limit:
            self.finish_save()
            raise TrainingError(
                f"{bad}; {self.skips_in_a_row} steps in a row skipped, more than "
                f"trainer.max_skips={limit}; last good checkpoint: "
                f"{self.last_checkpoint or 'none (no checkpoint was saved yet)'}"
            )
        log.warning("%s: update skipped (trainer.anomaly=skip)", bad)

    def _on_anomaly(self, bad: Anomaly) -> None:
        """trainer.anomaly: halt, or roll back to the last checkpoint and skip the bad batch."""
        self.finish_save()
        t, where, what = self.cfg.trainer, self.last_checkpoint, str(bad)
        if t.anomaly == "halt" or where is None or self.rollbacks >= t.max_rollbacks:
            why = ""
            if t.anomaly == "rollback":
                why = (
                    "; no checkpoint to roll back to"
                    if where is None
                    else f"; trainer.max_rollbacks={t.max_rollbacks} reached"
                )
            good = where or "none (no checkpoint was saved yet)"
            raise TrainingError(f"{what}{why}; last good checkpoint: {good}")
        self.rollbacks += 1
        log.warning("%s: rolling back to %s and skipping that batch", what, where)
        self.skipped.append([bad.windows.start, bad.windows.stop])
        self.resume(where)

    def _skip_bad_batch(self) -> None:
        """At a batch a rollback condemned, move past it unread."""
        position = self.train_data.position
        for start, stop in self.skipped:
            if start == position:
                log.info(
                    "step %d: skipping windows [%d, %d) (rolled back)", self.step + 1, start, stop
                )
                self._move_past(stop - start)
                return

    def _move_past(self, windows: int) -> None:
        """Move the train stream past `windows` global windows, unread."""
        self.train_data.skip(windows)
        self._batches = iter(self.train_data)
        self._pairs = pairs(self._batches)

    def _stop_on(self, signum: int) -> dict[str, Any]:
        """A stop request (see cluster/signals.py): checkpoint this step and stop here."""
        log.info("%s at step %d: checkpointing, then stopping", signal_name(signum), self.step)
        if self.saved_step != self.step:
            self.save()
        return {"stopped_by": signal_name(signum), "step": self.step}

    def _log_train(self, window: list[dict[str, float]], seconds: float) -> None:
        """One line for the steps since the last; skipped steps (trainer.anomaly=skip) count in
        the throughput, not in the mean loss."""
        tokens_per_s = len(window) * self.tokens_per_step / max(seconds, 1e-9)
        applied = [w for w in window if "skipped" not in w]
        last = applied[-1] if applied else {}
        record = {
            "step": self.step,
            "max_steps": self.cfg.trainer.max_steps,
            "loss": sum(w["loss"] for w in applied) / len(applied) if applied else math.nan,
            "lr": last.get("lr", self.scheduler.get_last_lr()[0]),
            "grad_norm": last.get("grad_norm", math.nan),
            "tokens_per_s": tokens_per_s,
            "mfu": metrics.mfu(
                tokens_per_s=tokens_per_s,
                flops_per_token=self.flops_per_token,
                peak=self.peak_flops,
                n_devices=self.dims.world_size,
            ),
            "memory_gib": metrics.memory_gib(self.device),
            "tokens": self.consumed_tokens,
            "epoch": self.train_data.epoch,
        }
        if len(applied) < len(window):
            record["skipped"] = len(window) - len(applied)
        log.info(format_line(record))
        self.logbook.write(record)
