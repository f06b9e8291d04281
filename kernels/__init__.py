"""Fused Triton kernels for megalite's hot ops, installed as `megalite.kernels`.

rmsnorm (optionally fused with the residual add), rotary (q and k in one kernel), swiglu and
cross_entropy (chunked over the vocabulary, on one device or a vocab-parallel shard): each a
forward and backward kernel and an autograd wrapper. `reference` holds the torch reference of each
(torch only, importable without triton): the contract the kernels' tests hold them to, and the
fallback the model's op dispatch runs when `kernels.backend` does not choose Triton; that dispatch
imports the Triton modules lazily, so nothing else needs triton installed.

This is the lowest layer: these modules import torch, triton and each other (`_common`,
`reference`) only, never the model. This folder is mapped to `megalite.kernels` in
pyproject.toml so that it can never clash with the unrelated PyPI package named `kernels`.
"""
