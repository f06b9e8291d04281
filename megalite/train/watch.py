"""What the model can do, watched during training: text samples and lm-eval task scores.

Both run the model the engine trains, in any layout, as one decoder of the full model
(`infer.spread.SpreadDecoder`: vocabulary shards gathered over TP, sequence-parallel chunks
padded, the pipeline's stages run in order with the hidden states sent from stage to stage, the
last stage's logits broadcast), in eval mode, with the run's data tokenizer. Who runs it: DP
group 0's ranks (its TP ranks and pipeline stages), the other DP ranks, whose weights are the
same, going on to the next step and waiting at its first collective; under ZeRO-3, whose
parameters are partitioned over DP, every rank, in lockstep. Every rank that runs it takes the
same requests in the same order and the same tokens, so their collectives match.

Samples (`trainer.sample_interval`): every N steps and at the end, each of
`trainer.sample_prompts` is continued greedily (`infer.generate`, with the KV cache); global rank
0 logs the lines and writes them down (`Logbook.write_samples`).

Tasks (`trainer.eval_tasks`): at every evaluation they are scored with lm-eval
(`infer.lm_eval.MegaliteLM` around the decoder): each rank that runs the model runs the same
`simple_evaluate`, whose requests, their order and batches are deterministic. Global rank 0 puts
each metric (`task/metric`) in the val_loss record. The global RNGs are left as they are (no
lm-eval seeding but the few-shot sampler's).
"""

from __future__ import annotations

import logging
from typing import Any

from megalite.config import Config
from megalite.infer.generate import check_request, generate
from megalite.infer.load import Tokenizer
from megalite.infer.spread import SpreadDecoder
from megalite.infer.spread import full_vocab as full_vocab  # re-exported: the trainer's gather
from megalite.parallel.dims import ParallelDims
from megalite.train.logbook import Logbook

log = logging.getLogger("megalite")


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
        t, p = cfg.trainer, cfg.parallel
        self.tokenizer = tokenizer
        zero3 = p.effective_zero_stage == 3
        self.decoder = SpreadDecoder(
            engine.module, dims, cfg=cfg.model, sequence_parallel=p.sequence_parallel, zero3=zero3
        )
        self.runs = zero3 or dims.dp_rank == 0  # this rank decodes (module docstring)
        self._sample_ids: list[list[int]] = []
        if t.sample_interval:
            self._sample_ids = [tokenizer.encode(p) for p in t.sample_prompts]
            # A prompt that does not fit fails here, not at the first sample.
            check_request(self.decoder, self._sample_ids, max_new_tokens=t.sample_tokens)
        self._tasks: Any = None  # lm-eval's task index (trainer.eval_tasks), where it runs
        if t.eval_tasks and self.runs:
            self._tasks = task_index(t.eval_tasks, t.eval_include_path)

    def sample(self, step: int) -> list[str]:
        """The greedy continuation of each of trainer.sample_prompts by the model as it is now
        (see the module docstring), logged and written down by global rank 0; [] where the model
        does not run. Collective over the ranks that run it."""
        t = self.cfg.trainer
        if not self.runs:
            return []
        eos = self.tokenizer.eos_id
        self.decoder.eval()
        try:
            new = generate(self.decoder, self._sample_ids, max_new_tokens=t.sample_tokens,
                           stop_ids=() if eos is None else (eos,))  # fmt: skip
        finally:
            self.decoder.train()
        texts = [self.tokenizer.decode(ids) for ids in new]
        if self.logbook.enabled:
            for prompt, text in zip(t.sample_prompts, texts, strict=True):
                one_line = text.replace("\n", "\\n")
                log.info("sample step %d | %s → %s", step, prompt, one_line)
            self.logbook.write_samples(step, list(zip(t.sample_prompts, texts, strict=True)))
        return texts

    def score_tasks(self) -> dict[str, float]:
        """trainer.eval_tasks scored by lm-eval on the model as it is, `task/metric` -> value, on
        global rank 0 ({} elsewhere; see the module docstring). Collective over the ranks that
        run the model."""
        t = self.cfg.trainer
        if self._tasks is None:
            return {}
        import lm_eval  # type: ignore[import-untyped]

        from megalite.infer.evaluate_cli import metric_rows
        from megalite.infer.lm_eval import MegaliteLM

        lm = MegaliteLM(decoder=self.decoder, tokenizer=self.tokenizer)
        self.decoder.eval()
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(t.eval_tasks),
                limit=t.eval_limit,
                task_manager=self._tasks, bootstrap_iters=0, log_samples=False,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                fewshot_random_seed=0,
            )  # fmt: skip
        finally:
            self.decoder.train()
        if not self.logbook.enabled:  # another rank (lm-eval returns None where LOCAL_RANK
            return {}  # is not 0): global rank 0 reports
        return {f"{task}/{metric}": value for task, metric, value, _ in metric_rows(results)}
