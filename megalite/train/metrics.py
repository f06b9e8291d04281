"""Throughput, MFU and memory figures for the training log.

MFU = achieved model FLOP/s / peak FLOP/s, with the model's FLOPs per token counted exactly from
its shape (attention and logits included, see `megalite.model.flops`), and the peak from
`trainer.peak_flops`, else the datasheet table below, else `trainer.cpu_peak_flops` on CPU.
"""

from __future__ import annotations

import os

import psutil
import torch

# Dense (no sparsity) datasheet peaks per GPU, in FLOP/s, keyed by a substring of the device name.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 NVL": {"bf16": 835e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "GH200": {"bf16": 989e12, "fp32": 67e12},
    "B200": {"bf16": 2250e12, "fp32": 80e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp32": 31e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},  # fp16 tensor cores; V100 has no bf16
    "MI300X": {"bf16": 1307e12, "fp32": 163e12},
    "MI250X": {"bf16": 383e12, "fp32": 47.9e12},
}


def peak_flops(
    device: torch.device, *, precision: str, configured: float | None, cpu_peak: float
) -> float:
    """Peak FLOP/s of one device for MFU."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_FLOPS.items():
            if key in name:
                return peaks["bf16" if precision == "bf16" else "fp32"]
        raise ValueError(f"unknown GPU {name!r}: set trainer.peak_flops to its peak FLOP/s")
    return cpu_peak


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process, or its resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def mfu(*, tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    return tokens_per_s * flops_per_token / (peak * n_devices)
