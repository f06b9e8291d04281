"""Fused Triton kernels for megalite's hot ops, installed as `megalite.kernels`.

The kernels themselves (RMSNorm, rotary, SwiGLU, chunked cross-entropy, each with its torch
reference and an autograd wrapper) arrive with the fused-kernels issue; until then
`megalite/model/ops.py` dispatches to flash-attn/apex when installed and to exact torch otherwise.
This folder is mapped to `megalite.kernels` in pyproject.toml so that it can never clash with the
unrelated PyPI package named `kernels`.
"""
