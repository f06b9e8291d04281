"""Triton kernels run on CPU tensors through Triton's interpreter (set before any kernel module is
imported: triton reads it when a kernel is decorated)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure() -> None:
    """tools/dev.py test runs the kernels under two Tritons: with MEGALITE_EXPECT_TRITON set, a
    run under another one than that stops at once."""
    import triton

    expected = os.environ.get("MEGALITE_EXPECT_TRITON")
    if expected and triton.__version__ != expected:
        raise pytest.UsageError(f"triton {triton.__version__} imported, {expected} expected")


@pytest.fixture(autouse=True)
def device():
    """CPU tensors through the interpreter; with TRITON_INTERPRET=0 on a CUDA machine, the GPU."""
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
    with torch.device("cuda" if on_gpu else "cpu"):
        yield
