"""Samples and task scores during training in the layouts where no rank holds the whole model:
a pipeline (tp=1 x pp=2), a pipeline of sequence-parallel TP groups (tp=2 x pp=2), ZeRO-3
(dp=2) and ZeRO-3 of sequence-parallel TP groups (tp=2 x dp=2). Each run samples at steps 2 and
4 and scores a local multiple-choice task at every evaluation; its final samples equal a single
process's `generate` on the final checkpoint and its final scores lm-eval's offline score of it.
One run per layout, read by every test of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite.launch import launch
from megalite.train.logbook import log_file
from tests.helpers import read_metrics, short_job
from tests.infer.tasks import MC_TASK
from tests.train.test_samples import assert_samples_are_logged_and_generated

PROMPTS = ["ROMEO:", "JULIET:"]
TOKENS = 12
QUESTIONS = [
    ("ROMEO: But soft, what light", [" through yonder window", " the king"], 0),
    ("JULIET: O Romeo, Romeo, wherefore", [" art thou", " my lord"], 0),
    ("To be, or not", [" to be", " the duke"], 0),
]
LAYOUTS = {
    "pp2": ["parallel.pp=2"],
    "tp2xpp2_sp": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
    "dp2_zero3": ["parallel.dp=2", "parallel.zero_stage=3", "trainer.global_batch_size=16"],
    "tp2xdp2_sp_zero3": ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=3",
                         "parallel.sequence_parallel=true", "trainer.global_batch_size=16"],
}  # fmt: skip


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the task tiny_mc over QUESTIONS (a local file: nothing downloaded)."""
    folder = tmp_path_factory.mktemp("tasks")
    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    return folder


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, sample_data: Path, tasks: Path, tmp_path_factory) -> Path:
    """The run folder of a 4-step run in one of LAYOUTS that samples every 2 steps and scores
    tiny_mc at every 2 steps' evaluation."""
    pytest.importorskip("lm_eval")
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    cfg = short_job(sample_data, run_dir, *LAYOUTS[request.param], "logging.wandb.mode=offline",
                    "trainer.sample_interval=2", 'trainer.sample_prompts=["ROMEO:","JULIET:"]',
                    f"trainer.sample_tokens={TOKENS}", "trainer.eval_interval=2",
                    "trainer.eval_tasks=[tiny_mc]", f'trainer.eval_include_path=["{tasks}"]',
                    steps=4)  # fmt: skip
    launch(cfg, default_run_dir=run_dir)
    return run_dir


def test_samples_are_logged_and_equal_a_single_process_generate(run: Path) -> None:
    assert_samples_are_logged_and_generated(run, tokens=TOKENS)


def test_task_scores_equal_an_offline_score_of_the_final_checkpoint(run: Path, tasks: Path) -> None:
    import lm_eval

    from megalite.infer.evaluate_cli import task_manager
    from megalite.infer.lm_eval import MegaliteLM

    records = [r for r in read_metrics(run) if "val_loss" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all({"tiny_mc/acc", "tiny_mc/acc_norm"} <= r.keys() for r in records)
    assert "| tiny_mc/acc " in log_file(run, 0).read_text()
    assert "| tiny_mc/acc " not in log_file(run, 1).read_text()  # rank 0 alone reports
    offline = lm_eval.simple_evaluate(
        model=MegaliteLM(checkpoint=str(run)), tasks=["tiny_mc"], bootstrap_iters=0,
        task_manager=task_manager((str(tasks),)),
    )  # fmt: skip
    for metric in ("acc", "acc_norm"):
        assert offline["results"]["tiny_mc"][f"{metric},none"] == records[-1][f"tiny_mc/{metric}"]
