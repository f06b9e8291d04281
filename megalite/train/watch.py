"""What the model can do, watched during training: text samples and lm-eval task scores.

Samples (`trainer.sample_interval`, pp=1 without ZeRO-3): every N steps and at the end, DP rank 0's
model group continues each of `trainer.sample_prompts` greedily (`infer.generate` on
`engine.module`, eval mode, the run's data tokenizer); with tp > 1 all its TP ranks decode
together, the vocabulary shards of each step's logits gathered so that every rank takes the same
token. The other DP ranks, whose weights are the same, go on to the next step. Global rank 0 logs
the lines and writes them down (`Logbook.write_samples`).

Tasks (`trainer.eval_tasks`, pp=1, no ZeRO-3 or sequence parallelism): at every evaluation DP
rank 0's model group scores them with lm-eval (`infer.lm_eval.MegaliteLM` around
`engine.module`, the data tokenizer). With tp > 1 each of its TP ranks runs the same
`simple_evaluate` in lockstep: the requests, their order and batches are deterministic, hence the
same on every TP rank, and each forward's vocabulary shards are gathered (the whole sequence's),
so that every rank scores and generates the same. Global rank 0 puts each metric (`task/metric`)
in the val_loss record; the other DP ranks wait at the next collective. The global RNGs are left
as they are (no lm-eval seeding but the few-shot sampler's).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from megalite.config import Config
from megalite.infer.generate import check_request, generate
from megalite.infer.load import Loaded, Tokenizer
from megalite.parallel.dims import ParallelDims
from megalite.train.logbook import Logbook

log = logging.getLogger("megalite")


def full_vocab(
    logits: torch.Tensor, tp_group: dist.ProcessGroup, *, vocab_size: int
) -> torch.Tensor:
    """This TP rank's shard of the padded vocabulary's logits (..., padded / tp), gathered over
    `tp_group` into the full (..., vocab_size), padding cut: the same on every TP rank. Any
    leading shape: (b,) for a decoding step, (b, s) for a scored sequence. Collective."""
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]  # (..., vocab_size)


def task_index(tasks: list[str], include_path: list[str]) -> Any:
    """lm-eval's task index with the folders `include_path`; an unknown task raises ValueError
    in one line (before the first step)."""
    from megalite.infer.evaluate_cli import task_manager, unknown_tasks

    manager = task_manager(tuple(include_path))
    if problem := unknown_tasks(list(tasks), manager):
        raise ValueError(f"trainer.eval_tasks: {problem}")
    return manager


class QualityWatch:
    """trainer.sample_interval's samples and trainer.eval_tasks's scores of the model that
    `engine` trains, decoded with the data's `tokenizer`; built before the first step, so that a
    prompt that does not fit or an unknown task fails then."""

    def __init__(
        self,
        cfg: Config,
        *,
        engine: Any,
        dims: ParallelDims,
        tokenizer: Tokenizer,
        logbook: Logbook,
    ) -> None:
        self.cfg, self.engine, self.dims, self.logbook = cfg, engine, dims, logbook
        t = cfg.trainer
        self.tokenizer = tokenizer
        self._sample_ids: list[list[int]] = []
        if t.sample_interval:
            self._sample_ids = [tokenizer.encode(p) for p in t.sample_prompts]
            # A prompt that does not fit fails here, not at the first sample.
            check_request(engine.module, self._sample_ids, max_new_tokens=t.sample_tokens)
        self._tasks: Any = None  # lm-eval's task index (trainer.eval_tasks), on DP rank 0
        if t.eval_tasks and dims.dp_rank == 0:
            self._tasks = task_index(t.eval_tasks, t.eval_include_path)

    def sample(self, step: int) -> list[str]:
        """The greedy continuation of each of trainer.sample_prompts by the model as it is now
        (see the module docstring), logged and written down by global rank 0; [] on a DP rank
        other than 0. Collective over TP."""
        t = self.cfg.trainer
        if self.dims.dp_rank != 0:
            return []
        model = self.engine.module
        eos = self.tokenizer.eos_id
        model.eval()
        try:
            new = generate(
                model,
                self._sample_ids,
                max_new_tokens=t.sample_tokens,
                stop_ids=() if eos is None else (eos,),
                use_cache=model.document_eod is None,  # the cache takes no document mask
                logits_fn=self._full_vocab if self.dims.tp > 1 else None,
            )
        finally:
            model.train()
        texts = [self.tokenizer.decode(ids) for ids in new]
        if self.logbook.enabled:
            for prompt, text in zip(t.sample_prompts, texts, strict=True):
                one_line = text.replace("\n", "\\n")
                log.info("sample step %d | %s → %s", step, prompt, one_line)
            self.logbook.write_samples(step, list(zip(t.sample_prompts, texts, strict=True)))
        return texts

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return full_vocab(logits, self.dims.group("tp"), vocab_size=self.cfg.model.vocab_size)

    def score_tasks(self) -> dict[str, float]:
        """trainer.eval_tasks scored by lm-eval on the model as it is, `task/metric` -> value, on
        global rank 0 ({} elsewhere; see the module docstring). Collective over TP."""
        t = self.cfg.trainer
        if self._tasks is None:
            return {}
        import lm_eval  # type: ignore[import-untyped]

        from megalite.infer.evaluate_cli import metric_rows
        from megalite.infer.lm_eval import MegaliteLM

        model = self.engine.module
        loaded = Loaded(model=model, tokenizer=self.tokenizer, source=self.tokenizer.source)
        logits_fn = self._full_vocab if self.dims.tp > 1 else None
        model.eval()
        try:
            results = lm_eval.simple_evaluate(
                model=MegaliteLM(loaded=loaded, logits_fn=logits_fn), tasks=list(t.eval_tasks),
                limit=t.eval_limit,
                task_manager=self._tasks, bootstrap_iters=0, log_samples=False,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                fewshot_random_seed=0,
            )  # fmt: skip
        finally:
            model.train()
        if not self.logbook.enabled:  # another TP rank (lm-eval returns None where LOCAL_RANK
            return {}  # is not 0): global rank 0 reports
        return {f"{task}/{metric}": value for task, metric, value, _ in metric_rows(results)}
