"""The model with `kernels.backend=triton` (Triton's interpreter on CPU) trains like `torch`: the
tiny model's loss and every gradient directly, and a tp=2 run end to end (vocab-parallel loss,
SwiGLU on the fused projection's halves, rotary over GQA heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.launch import launch
from megalite.model import ops
from megalite.model.llama import Llama
from tests.helpers import compose_config, read_metrics, short_job, train_losses
from tests.kernels.helpers import rel_err


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_small_model_loss_and_grads(dtype: torch.dtype, bound: float) -> None:
    """fp32: loss and every gradient within 1e-5. bf16: the loss within 1e-2; weight gradients come
    out of bf16 matmuls of bf16 activation gradients, whose rounding (truncation in Triton's
    interpreter, not on a GPU) the matmul amplifies: 1.0-1.1e-2 measured on head and MLP weights.
    So whole-model gradients are checked in fp32, and each kernel's bf16 gradients against the
    1e-2 bound on its own in the kernel tests."""
    cfg = compose_config(["model=tiny", "model.n_layers=2", "model.vocab_size=512"]).model
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    out = {}
    try:
        for backend in ("torch", "triton"):
            ops.configure(backend)
            model.zero_grad()
            loss = ops.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], ignore_index=-100)
            loss.backward()
            out[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        ops.configure("auto")
    assert ops.describe_backends(device="cpu")["rms_norm"] == "torch"  # auto on CPU
    assert rel_err(out["triton"][0], out["torch"][0]) <= bound
    if dtype == torch.float32:
        for name, grad in out["torch"][1].items():
            assert rel_err(out["triton"][1][name], grad) <= bound, name


def test_tp_run_matches_torch_backend(sample_data: Path, tmp_path: Path) -> None:
    """A tp=2 run (one step, then the eval after the update) with the Triton kernels gives the
    torch backend's losses."""
    losses, val = {}, {}
    for backend in ("torch", "triton"):
        run_dir = tmp_path / backend
        small = [
            "model.n_layers=2",
            "trainer.seq_len=16",
            "trainer.micro_batch_size=4",
            "trainer.global_batch_size=4",
        ]
        cfg = short_job(
            sample_data, run_dir, "parallel.tp=2", f"kernels.backend={backend}", *small, steps=1
        )
        launch(cfg, default_run_dir=run_dir)
        losses[backend] = train_losses(run_dir)
        val[backend] = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]
    torch.testing.assert_close(
        torch.tensor([losses["triton"][1], val["triton"]], dtype=torch.float64),
        torch.tensor([losses["torch"][1], val["torch"]], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    log = (tmp_path / "triton" / "logs" / "rank_00000.log").read_text()
    assert "'rms_norm': 'triton'" in log and "'cross_entropy': 'triton (chunked)'" in log
