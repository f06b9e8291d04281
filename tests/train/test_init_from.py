"""`trainer.init_from`: a new run from a model's weights only. A Hugging Face Llama (random,
built locally, with the sample's tokenizer) starts a tp=2 x pp=2 run whose first loss is the HF
model's own on the first batch; that run's native checkpoint starts a tp=1 x pp=2 run; and what
cannot run is refused before any process starts, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.store import CheckpointError
from megalite.config import ConfigError
from megalite.data.stream import TokenStream
from megalite.launch import launch, names_model, prepare_run
from tests.helpers import compose_config, read_metrics, save_hf, train_losses

SEQ, MICRO = 32, 2
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]
INITIALISED = "(weights only: step 0, fresh optimizer and schedule)"


def job(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A one-step job with no model= (init_from gives it); `extra` wins."""
    return [
        f"data.path={data}", "trainer.max_steps=1", f"trainer.seq_len={SEQ}",
        f"trainer.micro_batch_size={MICRO}", f"trainer.global_batch_size={MICRO}",
        "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.eval_steps=1",
        "trainer.save_interval=0", "optim.lr=3e-3", "optim.warmup_steps=1",
        "logging.wandb.mode=disabled", f"trainer.run_dir={run_dir}", *extra,
    ]  # fmt: skip


def first_val_loss(run_dir: Path) -> float:
    return next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r)


@pytest.fixture(scope="module")
def hf_dir(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    save_hf(folder, tokenizer=sample_data / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def hf_run(sample_data: Path, hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a tp=2 x pp=2 run of one step initialised from `hf_dir`."""
    run_dir = tmp_path_factory.mktemp("run-hf")
    cfg = compose_config(job(sample_data, run_dir, f"trainer.init_from={hf_dir}", *TP2_PP2))
    launch(cfg, default_run_dir=run_dir)
    return run_dir


def test_from_hugging_face_under_tp_and_pp(sample_data: Path, hf_dir: Path, hf_run: Path) -> None:
    """Step 0, the HF model's loss on the first training batch, a checkpoint of step 1, the
    shape from config.json, the tokenizer configuration shipped back by to-hf."""
    from megalite.checkpoint.cli import main as convert_main

    hf = save_hf(hf_dir.with_name("hf-again"), tokenizer=None)  # the same weights (seed 0)
    stream = TokenStream(sample_data, "train", seq_len=SEQ, micro_batch_size=MICRO, dp_rank=0,
                         dp_size=1, seed=1234, shuffle=True)  # fmt: skip
    batch = next(iter(stream))
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert train_losses(hf_run) == {1: pytest.approx(want.item(), abs=1e-5)}
    ckpt = store.latest(hf_run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000001"
    meta = store.read_meta(ckpt)
    assert meta["step"] == 1 and meta["model"]["dim"] == 64 and meta["model"]["rope_theta"] == 5e4
    assert meta["init_from"] == str(hf_dir)
    log = (hf_run / "logs" / "rank_00000.log").read_text()
    assert f"initialised from {hf_dir} {INITIALISED}" in log
    assert len(list((hf_run / "init_from").iterdir())) == 1  # converted once, for the ranks
    out = hf_run / "hf-out"
    assert convert_main(["to-hf", "--src", str(ckpt), "--dst", str(out), "--quiet"]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"chat_template": "{{ x }}"}


def test_from_a_native_checkpoint_of_another_layout(
    sample_data: Path, hf_run: Path, tmp_path: Path
) -> None:
    """A tp=1 x pp=2 run from the tp=2 x pp=2 run's folder (its latest checkpoint): its step-0
    validation loss is the loss that run ended with, and it starts at step 0 with a fresh
    schedule."""
    run_dir = tmp_path / "run"
    cfg = compose_config(job(sample_data, run_dir, f"trainer.init_from={hf_run}", "parallel.pp=2"))
    launch(cfg, default_run_dir=run_dir)
    ended = [r["val_loss"] for r in read_metrics(hf_run) if "val_loss" in r][-1]
    assert first_val_loss(run_dir) == pytest.approx(ended, abs=1e-5)
    assert first_val_loss(run_dir) != pytest.approx(first_val_loss(hf_run), abs=1e-3)
    lrs = [{r["step"]: r["lr"] for r in read_metrics(d) if "lr" in r} for d in (hf_run, run_dir)]
    assert lrs[0] == lrs[1] and list(lrs[1]) == [1]  # step 1, the first step of a fresh schedule
    assert [p.name for p in store.committed(run_dir / "checkpoints")] == ["step_00000001"]


def test_a_requeued_run_resumes_its_own(sample_data: Path, hf_dir: Path, hf_run: Path) -> None:
    """resume=auto in a run folder with its own checkpoints wins over init_from (a SLURM requeue
    with the same config): those are what the ranks load."""
    overrides = job(sample_data, hf_run, f"trainer.init_from={hf_dir}", *TP2_PP2,
                    "trainer.resume=auto", "trainer.max_steps=2")  # fmt: skip
    cfg = compose_config(overrides)
    resume = prepare_run(cfg, run_dir=hf_run, world_size=None, writer=False)
    assert [p.name for p in resume] == ["step_00000001"]


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refusals(sample_data: Path, hf_dir: Path, hf_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    init = f"trainer.init_from={hf_dir}"
    with pytest.raises(ConfigError) as e:  # init_from and resume=PATH
        cfg = compose_config(job(sample_data, run_dir, init, f"trainer.resume={hf_run}"))
        prepare_run(cfg, run_dir=run_dir, world_size=None, writer=False)
    assert "drop one of them" in one_line(e)
    with pytest.raises(ConfigError) as e:  # a model of another shape
        compose_config(job(sample_data, run_dir, init, "model=tiny"))
    assert "model=tiny differs from trainer.init_from" in one_line(e)
    assert "dim=" in str(e.value) and "leave model= out" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # neither kind of folder
        compose_config(job(sample_data, run_dir, f"trainer.init_from={tmp_path}"))
    assert "neither a megalite checkpoint" in one_line(e)


def test_refuses_data_of_another_tokenizer(sample_data: Path, tmp_path: Path) -> None:
    other = tmp_path / "tokenizer.json"  # the same vocabulary, other bytes: another file
    other.write_text(json.dumps(json.loads((sample_data / "tokenizer.json").read_text())))
    save_hf(tmp_path / "hf", tokenizer=other)
    cfg = compose_config(job(sample_data, tmp_path / "run", f"trainer.init_from={tmp_path}/hf"))
    with pytest.raises(ConfigError) as e:
        prepare_run(cfg, run_dir=tmp_path / "run", world_size=None, writer=False)
    assert one_line(e).startswith(f"data {sample_data} was prepared with tokenizer sha ")
    assert str(e.value).endswith(f"prepare the data with --tokenizer {tmp_path}/hf/tokenizer.json")


def test_refuses_a_vocabulary_too_small_for_the_data(sample_data: Path, tmp_path: Path) -> None:
    save_hf(tmp_path / "hf", tokenizer=None, vocab=256)
    cfg = compose_config(job(sample_data, tmp_path / "run", f"trainer.init_from={tmp_path}/hf"))
    with pytest.raises(ConfigError) as e:
        prepare_run(cfg, run_dir=tmp_path / "run", world_size=None, writer=False)
    assert "has 4096 tokens but model.vocab_size=256" in one_line(e)


def test_names_model() -> None:
    assert names_model(["model=7b"]) and names_model(["+model.dim=8", "x=1"])
    assert not names_model(["data.path=x", "trainer.init_from=y", "modelx=1"])
