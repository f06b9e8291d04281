"""Shared test helpers: compose a config the way `launch/pretrain.py` does, read a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from megalite.cluster.launch import CONF_DIR as CONF
from megalite.cluster.launch import compose_config

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["CONF", "ROOT", "compose_config", "read_metrics", "train_losses"]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
