"""Resharding: train tp=2 × pp=2 × dp=2 (the shared `run_3d`, see conftest.py), reshard to another
layout, resume: the losses are the uninterrupted run's (fp32, rel ≤ 1e-5), optimizer state and
data position included. Resumed natively in its own layout, the 3D run goes on bit for bit. The
layout-free checkpoint `reshard` writes is read by every tool as its source is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.cli import main as convert_main
from megalite.checkpoint.reader import KINDS, CheckpointReader, open_checkpoint
from tests.checkpoint.conftest import HALF as N
from tests.checkpoint.conftest import STEPS, THREE_D, train
from tests.helpers import read_metrics, train_losses

run = train  # a run of the shared schedule (STEPS = 2N steps)


@pytest.fixture(scope="module")
def source(run_3d: Path) -> dict[str, Path]:
    """The 3D run and its checkpoint of step N."""
    return {"straight": run_3d, "ckpt": run_3d / "checkpoints" / store.step_name(N)}


@pytest.fixture(scope="module")
def resharded(source: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The step-N checkpoint resharded to tp = pp = dp = 1 (a layout-free checkpoint)."""
    dst = tmp_path_factory.mktemp("resharded") / "u"
    args = ["reshard", "--src", str(source["ckpt"]), "--dst", str(dst), "--quiet"]
    assert convert_main([*args, "--tp=1", "--pp=1", "--dp=1"]) == 0
    return dst


def test_resume_in_the_same_layout_is_bit_identical(
    source: dict[str, Path], sample_data: Path, tmp_path: Path
) -> None:
    """tp × pp × dp = 2 × 2 × 2 resumed from its own step N trains steps N+1..2N with the
    uninterrupted run's losses bit for bit, the same on every rank's log line."""
    resumed = tmp_path / "resumed"
    run(sample_data, resumed, *THREE_D, f"trainer.resume={source['ckpt']}")
    want, got = train_losses(source["straight"]), train_losses(resumed)
    assert sorted(got) == list(range(N + 1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(got)]
    last = [
        next(ln for ln in log.read_text().splitlines() if f"step {STEPS}/{STEPS}" in ln)
        for log in sorted((resumed / "logs").glob("rank_*.log"))
    ]
    assert len(last) == 8 and len({ln.split("] ", 1)[1].split(" | lr")[0] for ln in last}) == 1
    final_val = [r["val_loss"] for r in read_metrics(source["straight"]) if "val_loss" in r][-1]
    assert [r["val_loss"] for r in read_metrics(resumed) if "val_loss" in r][-1] == final_val


def test_resume_on_new_layout(
    source: dict[str, Path], resharded: Path, sample_data: Path, tmp_path: Path
) -> None:
    """Resharded to one process (tp = pp = dp = 1, where every layout's shards meet); the other
    layouts are covered bit for bit by the round trip below."""
    run(sample_data, tmp_path / "run", "parallel.dp=1", "parallel.zero_stage=1",
        f"trainer.resume={resharded}")  # fmt: skip
    want, got = train_losses(source["straight"]), train_losses(tmp_path / "run")
    assert sorted(got) == list(range(N + 1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
        torch.tensor([want[s] for s in sorted(got)], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


# Every layout of the issue once, each a native checkpoint of its own, back to the source's:
# (tp, pp, dp, extra overrides). ZeRO-3 and bf16 (fp32 master weights kept) ride along.
CYCLE = [
    (4, 1, 1, []),
    (1, 4, 1, []),
    (1, 2, 2, ["parallel.zero_stage=1", "trainer.precision=bf16"]),
    (2, 1, 2, ["parallel.zero_stage=3"]),
    (2, 2, 2, ["parallel.zero_stage=1"]),
]


def test_round_trip_through_every_layout_is_bit_identical(
    source: dict[str, Path], sample_data: Path, tmp_path: Path
) -> None:
    """A → B → C … → A, each hop `reshard` then a run of the new layout that resumes and saves
    at once (`trainer.stop_at_step=N`, no step trained): every hop's native checkpoint holds
    the source's weights, Adam moments, step and data position bit for bit."""
    first = CheckpointReader(source["ckpt"])
    want = {kind: dict(first.tensors(kind)) for kind in KINDS}
    position = ("window", "epoch", "seed", "sources")  # not dp_size/dp_rank: the layout's own
    want_data = torch.load(first.path / store.rank_file(0), weights_only=False)["data"]
    ckpt = source["ckpt"]
    # The model the run evaluates (not only the optimizer's master copy) is the source's too:
    # fp32 runs of the same dp (the eval batches depend on it) print the same validation loss.
    val_loss = {2: _val_loss(ckpt.parents[1])}
    for i, (tp, pp, dp, extra) in enumerate(CYCLE):
        hop = f"{i}-{tp}x{pp}x{dp}"
        u = tmp_path / f"u-{hop}"
        args = ["reshard", "--src", str(ckpt), "--dst", str(u), "--quiet"]
        assert convert_main([*args, f"--tp={tp}", f"--pp={pp}", f"--dp={dp}"]) == 0
        layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", *extra]
        materialise = [f"trainer.resume={u}", f"trainer.stop_at_step={N}"]
        run(sample_data, tmp_path / hop, *layout, *materialise)
        ckpt = store.latest(tmp_path / hop / "checkpoints")
        if "trainer.precision=bf16" not in extra:
            loss = _val_loss(tmp_path / hop)
            assert loss == pytest.approx(val_loss.setdefault(dp, loss), rel=1e-5), hop
        reader = CheckpointReader(ckpt)
        assert (reader.tp, reader.pp, reader.dp, reader.step_count()) == (tp, pp, dp, N), hop
        for kind in KINDS:
            got = dict(reader.tensors(kind))
            assert list(got) == list(want[kind]), hop
            for name, t in got.items():
                assert torch.equal(t, want[kind][name]), (hop, kind, name)
        for rank in range(tp * pp * dp):
            state = torch.load(ckpt / store.rank_file(rank), weights_only=False)
            assert [state["data"][k] for k in position] == [want_data[k] for k in position]


def _val_loss(run_dir: Path) -> float:
    """The validation loss a run logged at step N."""
    return next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r and r["step"] == N)


def test_reshard_refuses_impossible_layouts(
    source: dict[str, Path], tmp_path: Path, capsys
) -> None:
    args = ["reshard", "--src", str(source["ckpt"]), "--dst", str(tmp_path / "x"), "--quiet"]
    assert convert_main([*args, "--tp=3", "--pp=1"]) == 2
    assert "cannot take tp=3" in capsys.readouterr().err
    assert convert_main([*args, "--tp=1", "--pp=8"]) == 2
    assert "exceeds model.n_layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A `to-hf` folder's tensors (one safetensors file at this size)."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_tools_read_a_resharded_checkpoint(
    source: dict[str, Path], resharded: Path, tmp_path: Path, capsys
) -> None:
    """inspect, verify, to-hf and reshard take the layout-free checkpoint as they take its
    native source: the same tensors, the same Hugging Face export, and resharded again (to
    another layout-free one) the same weights, moments and resume state."""
    assert convert_main(["inspect", str(resharded)]) == 0
    out = capsys.readouterr().out
    assert "layout       layout-free (resume in any layout), resharded from tp=2 pp=2 dp=2" in out
    assert "layers.3.mlp.w2.weight" in out and "head.weight" in out
    assert convert_main(["verify", str(resharded)]) == 0
    assert capsys.readouterr().out.endswith(
        "a layout-free checkpoint (written by reshard/from-hf)\n"
    )

    for name, ckpt in (("native", source["ckpt"]), ("free", resharded)):
        assert convert_main(["to-hf", "--src", str(ckpt), "--dst", str(tmp_path / name),
                             "--quiet"]) == 0  # fmt: skip
    want, got = hf_tensors(tmp_path / "native"), hf_tensors(tmp_path / "free")
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (tmp_path / "free" / "tokenizer.json").is_file()  # the run's, by its data path

    again = tmp_path / "again"
    args = ["reshard", "--src", str(resharded), "--dst", str(again), "--quiet", "--tp=2"]
    assert convert_main([*args, "--pp=2"]) == 0
    assert "layout    layout-free -> {'tp': 2, 'pp': 2, 'dp': 1}" in capsys.readouterr().out
    first, second = CheckpointReader(source["ckpt"]), open_checkpoint(again)
    assert second.layout_free and second.meta["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    assert second.resume_state() == open_checkpoint(resharded).resume_state()
    assert second.step_count() == first.step_count() == N
    for kind in KINDS:
        got = dict(second.tensors(kind))
        assert list(got) == first.names()
        assert all(torch.equal(got[n], t) for n, t in first.tensors(kind)), kind


def test_layout_free_damage_is_named(resharded: Path, tmp_path: Path, capsys) -> None:
    """A tensor file missing (even from meta.json's list), or a kind this megalite does not know:
    one line saying what kind of checkpoint it is and what it lacks."""
    damaged = tmp_path / "damaged"
    shutil.copytree(resharded, damaged)
    rel = "tensors/layers.1.attn.wk.weight.exp_avg.safetensors"
    (damaged / rel).unlink()
    meta = json.loads((damaged / store.META).read_text())
    del meta["files"][rel]  # not even listed: only the model's parameter list tells
    (damaged / store.META).write_text(json.dumps(meta))
    want = f"{damaged}: a layout-free checkpoint (written by reshard/from-hf) is missing its "
    for command in (["inspect", str(damaged)], ["verify", str(damaged)],
                    ["to-hf", "--src", str(damaged), "--dst", str(tmp_path / "hf")]):  # fmt: skip
        assert convert_main(command) == 2
        err = capsys.readouterr().err
        assert err == f"megalite-convert: error: {want}tensor file {rel}\n", command
    meta["format"] = "megalite-universal-99"
    (damaged / store.META).write_text(json.dumps(meta))
    assert convert_main(["inspect", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "names format 'megalite-universal-99'" in err and "'megalite-universal-1'" in err
    assert err.count("\n") == 1 and not (tmp_path / "hf").exists()
