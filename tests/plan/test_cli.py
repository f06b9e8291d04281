"""The planning CLI: each command as the issue types it, its --json fields, its pictures, its
one-line errors, and that it answers fast (no torch import)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from megalite.model.flops import flops_per_token, param_count
from megalite.plan import scaling
from megalite.plan.cli import main
from megalite.plan.gpus import KNOWN
from megalite.plan.presets import load_preset
from tests.helpers import ROOT

ESTIMATE_7B = (
    "estimate model=7b --gpus 256 --gpu h100 tp=2 pp=1 zero=1 micro_batch=2 seq_len=4096 "
    "global_batch=1024 ac=selective"
)
SEARCH_70B = "search model=70b --gpus 512 --gpu h100 --seq-len 4096 --global-batch 1024"


def run(capsys: pytest.CaptureFixture, command: str) -> tuple[int, str, str]:
    try:
        rc = main(command.split())
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture, command: str):
    rc, out, err = run(capsys, command + " --json")
    assert rc == 0, err
    return json.loads(out)


def test_chinchilla_compute(capsys) -> None:
    got = run_json(capsys, "chinchilla --compute 1e23")
    want = scaling.optimal(compute=1e23)
    assert got["params"] == pytest.approx(want.params)
    assert got["tokens"] == pytest.approx(want.tokens)
    assert got["compute_flops"] == 1e23
    assert got["loss"] == pytest.approx(want.loss)
    several = run_json(capsys, "chinchilla --compute 1e21 1e25 --fit epoch")
    assert [r["compute_flops"] for r in several] == [1e21, 1e25]
    assert all(r["fit"] == "epoch" for r in several)


def test_chinchilla_params_tokens_and_preset(capsys) -> None:
    got = run_json(capsys, "chinchilla --params 70e9 --method approach1")
    assert got["tokens"] == pytest.approx(1.46e12, rel=0.01)
    got = run_json(capsys, "chinchilla --tokens 2e12 --fit epoch")
    assert got["tokens"] == pytest.approx(2e12)
    got = run_json(capsys, "chinchilla model=7b seq_len=2048")
    cfg = load_preset("7b")
    assert got["params"] == param_count(cfg) == 6_738_415_616
    assert got["compute_flops"] == pytest.approx(flops_per_token(cfg, 2048) * got["tokens"])
    assert got["compute_flops_6nd"] == pytest.approx(6 * got["params"] * got["tokens"])


def test_chinchilla_table(capsys) -> None:
    rc, out, _ = run(capsys, "chinchilla --compute 1e21 1e23 1e25")
    assert rc == 0
    assert "params" in out and "tokens" in out and "loss" in out
    assert len(out.strip().splitlines()) == 5  # the law, a header, three budgets


def test_budget_cluster(capsys) -> None:
    got = run_json(
        capsys, "budget --gpus 512 --gpu h100 --days 30 --mfu 0.4 --price-per-gpu-hour 2.5"
    )
    assert got["compute_flops"] == pytest.approx(512 * 989.4e12 * 0.4 * 30 * 86400)
    assert got["gpu_hours"] == pytest.approx(512 * 30 * 24)
    assert got["cost"] == pytest.approx(512 * 30 * 24 * 2.5)
    want = scaling.optimal(compute=got["compute_flops"])
    assert got["params"] == pytest.approx(want.params)


def test_budget_job(capsys) -> None:
    got = run_json(capsys, "budget --model 7b --tokens 2e12 --gpus 512 --gpu h100")
    compute = flops_per_token(load_preset("7b"), 4096) * 2e12
    assert got["compute_flops"] == pytest.approx(compute)
    assert got["gpu_hours"] == pytest.approx(compute / (989.4e12 * 0.4) / 3600)
    assert got["days"] == pytest.approx(got["gpu_hours"] / 512 / 24)
    assert got["cost"] is None


def test_estimate(capsys) -> None:
    got = run_json(capsys, ESTIMATE_7B)
    lay = got["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["zero"], lay["micro_batch"]) == (2, 1, 128, 1, 2)
    assert lay["ac"] == "selective" and lay["grad_accum"] == 4
    assert got["flops_per_token"] == flops_per_token(load_preset("7b"), 4096)
    mem = got["memory"]
    parts = ("weights", "gradients", "optimizer_state", "activations", "temporary_buffers")
    assert all(mem[k] > 0 for k in parts)
    assert mem["fits"] and mem["total"] <= mem["usable"]
    assert got["time"]["bubble"] == 0 and got["time"]["tokens_per_s"] > 0
    # the training config's own key names give the same answer
    hydra = run_json(
        capsys,
        "estimate model=7b --gpus 256 --gpu h100 parallel.tp=2 parallel.pp=1 "
        "parallel.zero_stage=1 trainer.micro_batch_size=2 trainer.seq_len=4096 "
        "trainer.global_batch_size=1024 parallel.activation_checkpointing=selective",
    )
    assert hydra == got
    rc, out, _ = run(capsys, ESTIMATE_7B)
    for line in ("weights", "gradients", "optimizer state", "activations", "temporary buffers"):
        assert line in out
    assert "pipeline bubble" in out and "tokens/s" in out


def test_search(capsys) -> None:
    got = run_json(capsys, SEARCH_70B + " --top 0")
    layouts = got["layouts"]
    assert len(layouts) == got["fitting"] > 10
    speeds = [x["tokens_per_s"] for x in layouts]
    assert speeds == sorted(speeds, reverse=True)
    usable = 0.9 * KNOWN["h100-sxm"].memory_bytes
    assert all(x["memory"] <= usable for x in layouts)
    assert all(x["tp"] * x["pp"] * x["dp"] == 512 for x in layouts)
    reasons = {(r["tp"], r["pp"]): r["reason"] for r in got["rejected"]}
    assert "GPUs of a node" in reasons[(16, None)]
    assert "too little memory" in reasons[(1, 2)]
    assert "exceeds model.n_layers=80" in reasons[(1, 128)]
    rc, out, _ = run(capsys, SEARCH_70B)
    assert rc == 0 and "rejected:" in out and len(out.splitlines()) > 12


def test_search_names_divisibility(capsys) -> None:
    got = run_json(capsys, "search model=tiny --gpus 8 seq_len=256 global_batch=64")
    reasons = {(r["tp"], r["pp"]): r["reason"] for r in got["rejected"]}
    assert "n_heads=4 is not divisible by parallel.tp=8" in reasons[(8, 1)]
    fixed = run_json(capsys, "search model=tiny --gpus 8 seq_len=256 global_batch=64 tp=2 ac=none")
    assert {(x["tp"], x["ac"]) for x in fixed["layouts"]} == {(2, "none")}


def test_plots(capsys, tmp_path) -> None:
    for name, command in (
        ("iso.png", "chinchilla --compute 1e21 1e23 1e25"),
        ("budget.png", "budget --gpus 64 --gpu a100 --days 10"),
        ("estimate.png", ESTIMATE_7B.replace("pp=1", "pp=2")),
        ("search.png", "search model=7b --gpus 64 --gpu h100 --top 5"),
    ):
        path = tmp_path / name
        rc, out, err = run(capsys, f"{command} --plot {path}")
        assert rc == 0, err
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in out


@pytest.mark.parametrize(
    "command,message",
    [
        ("chinchilla --compute 0", "--compute must be a positive number"),
        ("chinchilla --compute -1e21", "--compute must be a positive number"),
        ("chinchilla --params -7e9", "--params must be a positive number"),
        ("budget --gpus 512 --gpu h100 --days 0", "--days must be a positive number"),
        ("budget --gpus -8 --gpu h100 --days 3", "--gpus must be a positive number"),
        ("budget --gpus 8 --gpu h100 --days 3 --mfu 1.5", "fraction of peak"),
        ("budget --gpus 8 --gpu v100 --days 3", "unknown GPU 'v100': use one of a100-40gb"),
        ("estimate model=7b --gpu tpu", "unknown GPU 'tpu'"),
        ("estimate model=8b", "unknown model '8b': use one of 125m"),
        ("estimate model=7b tp=3", "not divisible by parallel.tp=3"),
        ("estimate model=7b --gpus 10 tp=4", "not divisible by tp x pp"),
        ("estimate model=7b colour=red", "unknown setting 'colour'"),
        ("estimate --gpus 8", "needs a model"),
        ("search model=70b --gpus 8 --gpu l40s", "no layout of 70b fits on 8 x l40s"),
        ("chinchilla --compute lots", "invalid _count value"),
        ("plan-everything", "invalid choice"),
    ],
)
def test_bad_input_is_one_line(capsys, command: str, message: str) -> None:
    rc, out, err = run(capsys, command)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err


def test_custom_gpu(capsys) -> None:
    got = run_json(
        capsys, "budget --gpus 8 --gpu mychip --peak-tflops 500 --memory-gib 64 --days 1"
    )
    assert got["gpu"] == "mychip"
    assert got["compute_flops"] == pytest.approx(8 * 500e12 * 0.4 * 86400)


def test_tool_answers_fast_without_torch() -> None:
    """Every command in one fresh interpreter: none imports torch, the search takes < 1 s."""
    script = f"""
import sys, time
from megalite.plan.cli import main
for command in ("chinchilla --compute 1e23", "budget --gpus 512 --gpu h100 --days 30",
                "{ESTIMATE_7B}", "{SEARCH_70B}"):
    start = time.perf_counter()
    assert main(command.split()) == 0
    print("took", command.split()[0], time.perf_counter() - start, file=sys.stderr)
assert "torch" not in sys.modules and "matplotlib" not in sys.modules
"""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    times = {
        ln.split()[1]: float(ln.split()[2])
        for ln in proc.stderr.splitlines()
        if ln.startswith("took")
    }
    assert max(times.values()) < 1.0, times
    assert wall < 10, wall  # interpreter start included, generous for a loaded CI machine
    script_run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), "chinchilla", "--compute", "1e21"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script_run.returncode == 0 and "params" in script_run.stdout


def test_plot_without_a_name_writes_the_default(capsys, tmp_path, monkeypatch) -> None:
    """`--plot` alone writes <command>.png here and says so: after the table, on stderr with
    --json, and also when a key=value setting follows it (argparse would take it for the name)."""
    monkeypatch.chdir(tmp_path)
    for command in (
        "search model=7b --gpus 64 --gpu h100 --top 3 --plot",
        "search --plot model=7b --gpus 64 --gpu h100 --top 3",
    ):
        rc, out, err = run(capsys, command)
        assert rc == 0, err
        assert out.splitlines()[-1] == "plot: search.png"
        assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / "search.png").unlink()
    rc, out, err = run(capsys, "chinchilla --compute 1e21 --plot --json")
    assert rc == 0 and json.loads(out)["params"] > 0
    assert err == "plot: chinchilla.png\n" and (tmp_path / "chinchilla.png").exists()


def test_memory_legend_covers_no_bar() -> None:
    """Bars as tall as the axes everywhere: a legend inside them would cover one."""
    import matplotlib.pyplot as plt

    from megalite.plan.plots import memory_figure

    parts = [{"weights": 40e9, "optimizer": 30e9, "activations": 60e9}] * 5
    fig = memory_figure(labels=[f"layout {i}" for i in range(5)], parts=parts,
                        usable_bytes=130e9, title="memory")  # fmt: skip
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    plt.close(fig)
    assert bars and not any(legend.overlaps(bar) for bar in bars)


def test_estimate_host_memory_per_node_against_cluster_mem(capsys) -> None:
    """Host memory at start-up: the process plus the larger of one parameter drawn in fp32 and a
    resume's largest file, per rank and per node; cluster.mem given, a verdict (a warning when
    the node's ranks need more)."""
    from megalite.plan.layout import Layout
    from megalite.plan.memory import PROCESS_BYTES, stage_memory
    from megalite.plan.shape import stage_tensors

    base = "estimate model=70b --gpus 512 tp=8 pp=8 zero=1 seq_len=4096 global_batch=1024"
    host = run_json(capsys, base)["host"]
    cfg = load_preset("70b")
    lay = Layout(tp=8, pp=8, dp=8, zero=1, seq_len=4096, global_batch=1024)
    state = stage_memory(cfg, lay, host["stage"]).state
    assert host["resume"] == max(state.weights, state.optimizer)  # the ZeRO-1 partition file
    # its largest TP shard: the fused gate-up projection, in fp32
    assert host["build"] == 4 * max(t.numel for t in stage_tensors(cfg, tp=8, pp=8, stage=0))
    assert host["build"] == 4 * 2 * cfg.ffn_dim // 8 * cfg.dim
    assert host["per_rank"] == PROCESS_BYTES + max(host["build"], host["resume"])
    assert host["per_node"] == 8 * host["per_rank"] and host["fits"] is None
    assert run_json(capsys, base + " --node-mem 2T")["host"]["fits"] is True
    rc, out, _ = run(capsys, base + " cluster.mem=16G")
    assert rc == 0 and "WARNING: more than cluster.mem=16.00 GiB per node" in out
    assert run_json(capsys, base + " mem=0")["host"]["node_mem"] is None  # 0: the whole node
    rc, _, err = run(capsys, base + " mem=lots")
    assert rc == 2 and "not a SLURM memory size" in err
