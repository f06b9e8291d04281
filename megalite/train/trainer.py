"""The training loop: steps, evaluation and logging around a DeepSpeed engine.

One `Trainer` per process. Every rank runs the same loop; collective calls (all-reduce of the loss,
checkpoint save/load) happen at the same points on every rank, and only global rank 0 writes logs
and metrics. The step is the optimizer step: each consumes `grad_accum_steps` micro-batches per
data-parallel rank, i.e. `global_batch_size` sequences in all. What the loop leans on is built
outside and passed in (`worker.make_trainer`): the data (`streams.py`), the checkpoints
(`checkpointer.py`), the response to a bad loss (`anomaly.py`) and, if asked for, the samples and
task scores watched along the way (`watch.py`).

Saves: every `trainer.save_interval` steps (0: none along the way), at the end (max_steps or
stop_at_step) when `trainer.save_final`, and at a stop request (SIGUSR1/2, SIGTERM) unless the
run saves none at all (save_interval=0 and save_final=false: benchmarks).

The loss of a step (and of an evaluation) is the mean over the trained targets of the whole
global batch (`data/loss_mask.py`: SFT data marks prompt tokens untrained). A step reads its
micro-batches first and counts their trained targets over DP; each micro-batch's mean loss is
weighted by its share (`loss_mask.loss_weights`, `parallelize.weighted_loss`), so that
DeepSpeed's averaging over accumulation steps and DP ranks yields that global mean. With
pretraining data every weight is 1 and the losses are what a plain mean gives, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalite.config import Config, ConfigError
from megalite.data import loss_mask
from megalite.data.loader import Loader
from megalite.model.flops import flops_per_token
from megalite.model.llama import cross_entropy
from megalite.parallel.dims import ParallelDims
from megalite.parallel.discard import discarded_update, judge_before_step
from megalite.parallel.engine import megalite_clips
from megalite.parallel.parallelize import LossFn, weighted_loss
from megalite.rank import host
from megalite.rank.signals import StopRequest, signal_name
from megalite.train import metrics
from megalite.train.anomaly import Anomaly, AnomalyPolicy
from megalite.train.checkpointer import Checkpointer
from megalite.train.logbook import Logbook, format_line
from megalite.train.memory_check import MemoryCheck
from megalite.train.watch import QualityWatch
from megalite.train.watchdog import HangWatchdog

log = logging.getLogger("megalite")


def pairs(
    batches: list[torch.Tensor], weights: list[float]
) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """(inputs, (targets, weight)) of each (b, s + 1) window batch and its loss weight, as the
    pipeline engine loads them (see `pipeline.labelled_loss`)."""
    for batch, weight in zip(batches, weights, strict=True):
        inputs, targets = loss_mask.split_window(batch)  # (b, s), (b, s)
        yield inputs, (targets, torch.tensor(weight, dtype=torch.float32))


class Trainer:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: Any,
        scheduler: Any,
        dims: ParallelDims,
        device: torch.device,
        train_data: Loader,
        val_data: Callable[[], Iterable[torch.Tensor]],
        checkpointer: Checkpointer,
        anomalies: AnomalyPolicy,
        logbook: Logbook,
        hang_log: Path,
        loss_fn: LossFn = cross_entropy,
        stop: StopRequest | None = None,
        memory_check: MemoryCheck | None = None,
        watch: QualityWatch | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.memory_check = memory_check  # the plan beside the measured peak, after one step
        self.loss_fn = loss_fn
        self.engine = engine
        self.scheduler = scheduler
        self.dims = dims
        self.device = device
        self.train_data, self.val_data = train_data, val_data
        self.checkpoints = checkpointer
        self.anomalies = anomalies
        self.logbook = logbook
        self.hang_log = hang_log  # where the hang watchdog writes the stacks
        t = cfg.trainer
        self._batches = iter(self.train_data)
        self.step = 0
        self.consumed_tokens = 0
        self.initial_val_loss: float | None = None
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = metrics.peak_flops(
            device, precision=t.precision, configured=t.peak_flops, cpu_peak=t.cpu_peak_flops
        )
        self.clip_here = megalite_clips(cfg)
        self.pipeline = cfg.parallel.pp > 1
        # Only the pipeline's first and last stages read data (inputs, labels); any other stage
        # moves past a step's windows unread.
        self.reads_data = not self.pipeline or engine.is_first_stage() or engine.is_last_stage()
        self.masked = train_data.loss_mask  # else each micro-batch's weight is 1, uncounted
        if self.masked and dims.cp > 1:
            raise ConfigError(
                "data with a loss mask (SFT) does not run with parallel.cp > 1 yet (each cp rank's "
                "share of the trained targets differs): use parallel.cp=1"
            )
        if self.pipeline:
            judge_before_step(self.engine, self.anomalies.judge)
        self.watch = watch  # trainer.sample_interval, trainer.eval_tasks (watch.py)
        self._stop_signal: int | None = None  # agreed with this step's loss (_judged_loss)

    # ---- state ----------------------------------------------------------------------------

    def rank_state(self) -> dict[str, Any]:
        """What this rank's checkpoint file holds besides the engine's state."""
        return {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "initial_val_loss": self.initial_val_loss,
            "data": self.train_data.state_dict(),
            "anomaly": self.anomalies.state_dict(),
        }

    def resume_newest(self, candidates: list[Path]) -> None:
        """Resume from the first of `candidates` (newest first) that verifies. Collective."""
        self._restore(self.checkpoints.load_newest(candidates))

    def resume(self, ckpt: Path) -> None:
        """Restore the training state of `ckpt`, its files verified first. Collective."""
        self._restore(self.checkpoints.load(ckpt))

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.consumed_tokens = state["consumed_tokens"]
        self.initial_val_loss = state.get("initial_val_loss")
        if state["data"] is not None:  # None: imported weights, the stream starts afresh
            self.train_data.load_state_dict(state["data"])
        self.anomalies.load_state_dict(state.get("anomaly") or {})
        self._batches = iter(self.train_data)
        self.logbook.rewind(self.step)
        log.info(
            "resumed from %s at step %d (%d tokens seen)",
            self.checkpoints.last,
            self.step,
            self.consumed_tokens,
        )

    def save(self) -> None:
        """Checkpoint this step (see Checkpointer.save)."""
        self.checkpoints.save(self.step, self.rank_state())

    def _save_unless_saved(self) -> None:
        if not self.checkpoints.is_saved(self.step):
            self.save()

    # ---- steps ----------------------------------------------------------------------------

    def _dp_mean(self, value: torch.Tensor) -> float:
        """The mean of `value` over the dp x cp ranks (each cp rank's: the mean over its part of
        the sequence, equal in size), read on the host."""
        value = value.detach().to(torch.float64)
        dist.all_reduce(value, group=self.dims.group("dp_cp"))
        return host.read(value)[0] / self.dims.dp_cp

    def _judged_loss(self, loss: torch.Tensor) -> float:
        """The step's loss for the judge: its mean over DP, reduced over the whole world in one
        all-reduce with every rank's stop flags (`StopRequest.flags`), read in the step's one host
        sync. A DP replica's loss counts once per cp rank (its TP rank 0's; the others add 0,
        exactly), each cp rank's the mean over its equal part of the sequence."""
        mine = loss.detach().to(torch.float64).reshape(1) * float(self.dims.tp_rank == 0)
        parts = [mine] + ([self.stop.flags(self.device)] if self.stop is not None else [])
        stats = torch.cat(parts)  # (1 + signals,)
        dist.all_reduce(stats)
        values = host.read(stats)
        if self.stop is not None:
            self._stop_signal = self.stop.agree(values[1:])
        return values[0] / self.dims.dp_cp

    def _agreed_stop(self) -> int:
        """The stop request every rank agrees on at this step boundary: read with the step's
        loss where it was judged here, else (a pipeline) agreed by a collective of its own."""
        assert self.stop is not None
        if self._stop_signal is None:
            return self.stop.agreed(self.device)
        signum, self._stop_signal = self._stop_signal, None
        return signum

    def _weigh(self, batches: list[torch.Tensor], *, shares: int) -> tuple[list[float], int]:
        """The loss weight of each of this rank's micro-batches (`loss_mask.loss_weights`) and the
        trained targets of the whole global batch, whose mean over `shares` micro-batches per DP
        rank the engine takes. Collective over DP (one all-reduce of the count)."""
        if not self.masked:  # every target trained: equal weights, nothing to count or reduce
            b, s = batches[0].shape if batches else (0, 1)
            return [1.0] * len(batches), shares * self.dims.dp * b * (s - 1)
        counts = [loss_mask.trained_tokens(batch) for batch in batches]  # on the host: no sync
        total = torch.tensor(sum(counts), dtype=torch.int64, device=self.device)
        dist.all_reduce(total, group=self.dims.group("dp"))
        trained = int(host.read(total)[0])
        return loss_mask.loss_weights(counts, total=trained, shares=shares * self.dims.dp), trained

    def _weight(self, weight: float) -> torch.Tensor:
        return torch.tensor(weight, dtype=torch.float32, device=self.device)  # ()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns loss (the mean over the
        global batch's trained targets), lr, grad norm and trained_tokens (where this rank read
        the data). The loss is judged before the optimizer step (`AnomalyPolicy.judge`): an
        anomalous step's update is dropped and `Anomaly` raised (see anomaly.py and
        parallel/discard.py)."""
        lr = self.scheduler.get_last_lr()[0]
        first = self.train_data.position
        self.anomalies.begin_step(self.step + 1, first)
        accum = self.cfg.grad_accum_steps
        batches = [next(self._batches) for _ in range(accum)] if self.reads_data else []
        weights, trained = self._weigh(batches, shares=accum) if self.reads_data else ([], 0)
        if self.pipeline:
            # The pipeline engine runs the 1F1B schedule over all micro-batches and judges the
            # loss before its optimizer step (see __init__).
            self.engine.train_batch(pairs(batches, weights))
            if not self.reads_data:
                self._move_past(self.cfg.trainer.global_batch_size)
            grad_norm = self.engine.get_global_grad_norm()
        else:
            grad_norm = self._accumulate(batches, weights)
        self.step += 1
        self.consumed_tokens += self.tokens_per_step
        loss_value = self.anomalies.verdict()  # raises the step's Anomaly
        # The norm stays where it is (a tensor on the device, or DeepSpeed's float) until a log
        # line reads it: no host sync on a step that does not log.
        norm = grad_norm if grad_norm is not None else float("nan")
        record = {"loss": loss_value, "lr": lr, "grad_norm": norm}
        return record | ({"trained_tokens": float(trained)} if self.reads_data else {})

    def _accumulate(
        self, batches: list[torch.Tensor], weights: list[float]
    ) -> torch.Tensor | float | None:
        """Forward/backward over the micro-batches `batches` (b, s + 1) with their loss weights,
        the loss judged, and the optimizer step (no pipeline); returns the gradient norm."""
        accum = len(batches)
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for micro, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            batch = batch.to(self.device, non_blocking=True)  # (b, s + 1)
            inputs, targets = loss_mask.split_window(batch)  # (b, s), (b, s)
            logits = self.engine(inputs)
            loss = weighted_loss(self.loss_fn, logits, targets, self._weight(weight))
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < accum - 1:
                self.engine.step()  # no update before the accumulation boundary
                continue
            if self.anomalies.judge(self._judged_loss(loss_sum / accum)):
                with discarded_update(self.engine):
                    self.engine.step()
                return None
            if self.clip_here:
                grad_norm = self._clip_gradients()
            self.engine.step()
        return grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()

    def _clip_gradients(self) -> torch.Tensor:
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return clip_grad_norm_(params, max_norm, mpu=self.engine.mpu)  # (1,), on the device

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the trained targets of the first `eval_steps` micro-batches of every DP
        rank's val stream (weighted as a training step's, `eval_steps` micro-batches per rank);
        0 when they hold no trained target (raise trainer.eval_steps)."""
        t = self.cfg.trainer
        batches = list(islice(self.val_data(), t.eval_steps)) if self.reads_data else []
        weights, _ = self._weigh(batches, shares=t.eval_steps) if self.reads_data else ([], 0)
        if self.pipeline:  # averaged over micro-batches and DP, broadcast to every stage
            data = pairs(batches, weights)
            return float(self.engine.eval_batch(data, num_micro_batches=t.eval_steps))
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for batch, weight in zip(batches, weights, strict=True):
            inputs, targets = loss_mask.split_window(batch.to(self.device))  # (b, s), (b, s)
            logits = self.engine(inputs)
            total += weighted_loss(self.loss_fn, logits, targets, self._weight(weight)).float()
        self.engine.train()
        return self._dp_mean(total / t.eval_steps)

    # ---- the loop -------------------------------------------------------------------------

    def _log_eval(self, val_loss: float) -> None:
        scores = {} if self.watch is None else self.watch.score_tasks()
        ppl = math.exp(min(val_loss, 50.0))
        seen = {  # the realised mixture: training tokens drawn from each source so far
            name: windows * self.cfg.trainer.seq_len
            for name, windows in self.train_data.stream.windows_drawn().items()
        }
        mix = ""
        if len(seen) > 1:
            total = max(sum(seen.values()), 1)
            mix = " | mix " + " ".join(f"{k} {100 * v / total:.1f}%" for k, v in seen.items())
        mix += "".join(f" | {k} {v:.4f}" for k, v in scores.items())
        log.info("step %d | val_loss %.4f | val_ppl %.2f%s", self.step, val_loss, ppl, mix)
        self.logbook.write(
            {
                "step": self.step,
                "val_loss": val_loss,
                "val_ppl": ppl,
                "tokens": self.consumed_tokens,
                "tokens_per_source": seen,
                **scores,
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
        watchdog = HangWatchdog(self.hang_log, timeout_s=t.hang_timeout)
        try:
            result = self._loop(last, watchdog)
            self.checkpoints.finish()  # nothing left half-written at a clean exit
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
        window: list[dict[str, Any]] = []
        window_start, reads_at_start = time.perf_counter(), host.reads
        while self.step < last:
            watchdog.arm()
            self._skip_bad_batch()
            try:
                window.append(self.train_step())
                self._check_memory()
            except Anomaly as bad:
                where = self.anomalies.respond(bad, self.checkpoints.last_good)  # or raises
                if where is not None:
                    self.resume(where)  # a rollback continues from the checkpoint's step
                    continue
                window.append({"skipped": 1.0})
            if t.log_interval and (self.step % t.log_interval == 0 or self.step == last):
                self._log_train(window, time.perf_counter() - window_start, reads_at_start)
                window, window_start, reads_at_start = [], time.perf_counter(), host.reads
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < last:
                self._log_eval(self.evaluate())
            if t.sample_interval and self.step % t.sample_interval == 0 and self.step < last:
                self._sample()
            if t.save_interval and self.step % t.save_interval == 0:
                self.save()
            if self.stop is not None and (signum := self._agreed_stop()):
                return self._stop_on(signum)
        val_loss = self.evaluate()
        self._log_eval(val_loss)
        if t.sample_interval:
            self._sample()
        if t.save_final:
            self._save_unless_saved()
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

    def _sample(self) -> None:
        if self.watch is not None:
            self.watch.sample(self.step)

    def _skip_bad_batch(self) -> None:
        """At a batch a rollback condemned, move past it unread."""
        position = self.train_data.position
        if windows := self.anomalies.condemned_at(position):
            log.info(
                "step %d: skipping windows [%d, %d) (rolled back)",
                self.step + 1,
                position,
                position + windows,
            )
            self._move_past(windows)

    def _move_past(self, windows: int) -> None:
        """Move the train stream past `windows` global windows, unread."""
        self.train_data.skip(windows)
        self._batches = iter(self.train_data)

    def _stop_on(self, signum: int) -> dict[str, Any]:
        """A stop request (see rank/signals.py): checkpoint this step and stop here; a run that
        saves no checkpoint at all (save_interval=0, save_final=false) stops without one."""
        t = self.cfg.trainer
        if t.save_interval == 0 and not t.save_final:
            log.info(
                "%s at step %d: stopping without a checkpoint "
                "(trainer.save_interval=0 trainer.save_final=false)",
                signal_name(signum),
                self.step,
            )
        else:
            log.info("%s at step %d: checkpointing, then stopping", signal_name(signum), self.step)
            self._save_unless_saved()
        return {"stopped_by": signal_name(signum), "step": self.step}

    def _log_train(self, window: list[dict[str, Any]], seconds: float, reads_at_start: int) -> None:
        """One line for the steps since the last; skipped steps (trainer.anomaly=skip) count in
        the throughput, not in the mean loss. `trained_tokens`: the targets the applied steps
        trained on (all their tokens for pretraining data; fewer for SFT data, then named in
        the line too). `host_syncs` (metrics.jsonl): the host's reads of device values since
        the last line, this line's own included (`rank/host.py`)."""
        tokens_per_s = len(window) * self.tokens_per_step / max(seconds, 1e-9)
        applied = [w for w in window if "skipped" not in w]
        last = applied[-1] if applied else {}
        record = {
            "step": self.step,
            "max_steps": self.cfg.trainer.max_steps,
            "loss": sum(w["loss"] for w in applied) / len(applied) if applied else math.nan,
            "lr": last.get("lr", self.scheduler.get_last_lr()[0]),
            "grad_norm": host.read_float(last.get("grad_norm", math.nan)),
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
        record["host_syncs"] = host.reads - reads_at_start
        line = format_line(record)
        counted = [w["trained_tokens"] for w in applied if "trained_tokens" in w]
        if counted:  # this rank read the data (not a middle pipeline stage)
            record["trained_tokens"] = trained = int(sum(counted))
            share = trained / (len(counted) * self.tokens_per_step)
            if share < 1:
                line += f" | trained {trained:,} tok ({100 * share:.1f}%)"
        log.info(line)
        self.logbook.write(record)
