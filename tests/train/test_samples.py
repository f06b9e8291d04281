"""Samples during training (`trainer.sample_interval`): a dp=1 x tp=2 run logs the greedy
continuations of its prompts every N steps and at the end, in the rank-0 log, samples.jsonl and
its wandb run, equal to a single process's `generate` on the final checkpoint; the KV cache
decodes a TP-sharded model, and a sequence-parallel one spread as one decoder, as the plain one;
bad settings are refused in one line (the other layouts: test_samples_layouts.py).
Task scores (`trainer.eval_tasks`) of a tp=1 and a tp=2 run equal lm-eval's offline score of the
final checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from megalite.config import ConfigError, validate
from megalite.infer.generate import generate
from megalite.infer.load import load_model
from megalite.launch import compose_config, launch
from megalite.train.logbook import log_file
from tests.distributed import run_world
from tests.helpers import read_metrics, short_job
from tests.infer.tasks import MC_TASK

PROMPTS = ["ROMEO:", "JULIET:"]
SAMPLING = ["trainer.sample_interval=2", 'trainer.sample_prompts=["ROMEO:","JULIET:"]']


def assert_samples_are_logged_and_generated(run: Path, *, tokens: int) -> None:
    """The samples of steps 2 and 4 in samples.jsonl, rank 0's log (alone) and the wandb run; the
    last equal a single-process `generate` of the final checkpoint (step 4)."""
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4) for p in PROMPTS]
    lines = log_file(run, 0).read_text()
    for r in rows:
        text = r["text"].replace("\n", "\\n")
        assert f"sample step {r['step']} | {r['prompt']} → {text}" in lines
    assert "sample step" not in log_file(run, 1).read_text()  # rank 0 alone writes
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    assert list(wandb_run.rglob("samples_*.table.json")), "no samples table in the wandb run"

    loaded = load_model(run)  # the final checkpoint (step 4), the data's tokenizer
    tok = loaded.tokenizer
    assert tok is not None and tok.eos_id is not None
    new = generate(loaded.model, [tok.encode(p) for p in PROMPTS], max_new_tokens=tokens,
                   stop_ids=(tok.eos_id,))  # fmt: skip
    assert [r["text"] for r in rows[-2:]] == [tok.decode(ids) for ids in new]


def test_a_tp2_run_samples_what_one_process_generates(sample_data: Path, tmp_path: Path) -> None:
    cfg = short_job(sample_data, tmp_path, "parallel.tp=2", "logging.wandb.mode=offline",
                    "trainer.sample_tokens=12", *SAMPLING, steps=4)  # fmt: skip
    launch(cfg, default_run_dir=tmp_path)
    assert_samples_are_logged_and_generated(tmp_path, tokens=12)


def _tp_decoding(rank: int, world: int, out: str) -> None:
    from megalite.config import ModelConfig
    from megalite.model.llama import Llama
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.parallelize import apply_tp
    from megalite.train.watch import full_vocab

    torch.set_num_threads(1)
    cfg = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      vocab_size=301, max_seq_len=64)  # fmt: skip  # 301: vocabulary padding
    plain = Llama(cfg, seed=3).eval()
    dims = ParallelDims(tp=world, pp=1, dp=1, global_rank=rank)
    dims.build_groups()
    sharded = copy.deepcopy(plain)
    apply_tp(sharded, dims, sequence_parallel=False)
    prompts = [[5, 17, 2], [9, 1, 44, 300, 12, 7], [250]]  # left padding of 3, 0 and 5

    def gather(logits: torch.Tensor) -> torch.Tensor:
        return full_vocab(logits, dims.group("tp"), vocab_size=cfg.vocab_size)

    results = {
        "plain": generate(plain, prompts, max_new_tokens=10),
        "tp_cache": generate(sharded, prompts, max_new_tokens=10, logits_fn=gather),
        "tp_full": generate(sharded, prompts, max_new_tokens=10, logits_fn=gather, use_cache=False),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _sp_decoding(rank: int, world: int, out: str) -> None:
    from megalite.config import ModelConfig
    from megalite.infer.spread import SpreadDecoder
    from megalite.model.llama import Llama
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.parallelize import apply_tp

    torch.set_num_threads(1)
    cfg = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      vocab_size=301, max_seq_len=24)  # fmt: skip
    plain = Llama(cfg, seed=3).eval()
    dims = ParallelDims(tp=world, pp=1, dp=1, global_rank=rank)
    dims.build_groups()
    sharded = copy.deepcopy(plain)
    apply_tp(sharded, dims, sequence_parallel=True)
    spread = SpreadDecoder(sharded, dims, cfg=cfg, sequence_parallel=True, zero3=False)
    prompts = [[5, 17, 2], [9, 1, 44, 300, 12, 7, 8], [250]]  # odd lengths: padded chunks
    tokens = torch.tensor([[9, 1, 44, 300, 12, 7, 8]])
    results = {
        "plain": generate(plain, prompts, max_new_tokens=10),
        "sp_cache": generate(spread, prompts, max_new_tokens=10),
        "sp_full": generate(spread, prompts, max_new_tokens=10, use_cache=False),
        "plain_long": generate(plain, [list(range(1, 14))], max_new_tokens=11),  # to the end
        "sp_long": generate(spread, [list(range(1, 14))], max_new_tokens=11),
        "logits": bool(torch.allclose(spread(tokens), plain(tokens), atol=1e-5)),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_a_sequence_parallel_model_decodes_as_the_plain_one(tmp_path: Path) -> None:
    run_world(_sp_decoding, 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every TP rank took the same tokens
    r = ranks[0]
    assert r["logits"]
    assert r["sp_cache"] == r["plain"] == r["sp_full"]
    assert r["sp_long"] == r["plain_long"]


def test_the_kv_cache_decodes_a_tp_sharded_model(tmp_path: Path) -> None:
    run_world(_tp_decoding, 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every TP rank took the same tokens
    assert ranks[0]["tp_cache"] == ranks[0]["plain"] == ranks[0]["tp_full"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.sample_interval=2"],
            "trainer.sample_interval=2 continues trainer.sample_prompts, which is empty: set "
            'e.g. trainer.sample_prompts=["ROMEO:"] or trainer.sample_interval=0',
        ),
        (
            [*SAMPLING, "trainer.sample_tokens=0"],
            "trainer.sample_tokens=0 must be in [1, model.max_seq_len=1024)",
        ),
    ],
)
def test_what_cannot_sample_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["model=tiny", *overrides]))
    assert str(e.value) == message


QUESTIONS = [
    ("ROMEO: But soft, what light", [" through yonder window", " the king"], 0),
    ("JULIET: O Romeo, Romeo, wherefore", [" art thou", " my lord"], 0),
    ("To be, or not", [" to be", " the duke"], 0),
]


@pytest.mark.parametrize("tp", [1, 2])
def test_eval_tasks_are_scored_next_to_val_loss(sample_data: Path, tmp_path: Path, tp: int) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from megalite.infer.evaluate_cli import task_manager
    from megalite.infer.lm_eval import MegaliteLM

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl"))
    run_dir = tmp_path / "run"
    cfg = short_job(sample_data, run_dir, "trainer.eval_interval=1", "trainer.eval_tasks=[tiny_mc]",
                    f'trainer.eval_include_path=["{tasks}"]', f"parallel.tp={tp}",
                    steps=2)  # fmt: skip  # tp=2: both TP ranks score in lockstep
    launch(cfg, default_run_dir=run_dir)

    records = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all({"tiny_mc/acc", "tiny_mc/acc_norm"} <= r.keys() for r in records)
    assert "| tiny_mc/acc " in log_file(run_dir, 0).read_text()
    if tp > 1:
        assert "| tiny_mc/acc " not in log_file(run_dir, 1).read_text()  # rank 0 alone reports
    offline = lm_eval.simple_evaluate(
        model=MegaliteLM(checkpoint=str(run_dir)), tasks=["tiny_mc"], bootstrap_iters=0,
        task_manager=task_manager((str(tasks),)),
    )  # fmt: skip  # the final checkpoint (step 2), scored as megalite-evaluate does
    for metric in ("acc", "acc_norm"):
        assert offline["results"]["tiny_mc"][f"{metric},none"] == records[-1][f"tiny_mc/{metric}"]


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.pp=2"],
        ["parallel.dp=2", "parallel.zero_stage=3", "trainer.global_batch_size=16"],
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ],
)
def test_samples_and_eval_tasks_are_accepted_in_every_layout(layout: list[str]) -> None:
    validate(compose_config(["model=tiny", *layout, *SAMPLING, "trainer.eval_tasks=[tiny_mc]"]))
