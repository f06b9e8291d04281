from __future__ import annotations

import os
from pathlib import Path

import pytest

from megalite.data.sample import prepare_sample

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled Shakespeare sample, prepared once per test session."""
    return prepare_sample(tmp_path_factory.mktemp("data-cache"))
