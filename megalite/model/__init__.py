"""The plain model (no parallelism), its op backends and its cost model."""

from megalite.model.flops import count_params, flops_per_token, flops_per_token_6n
from megalite.model.llama import IGNORE_INDEX, Llama, TransformerBlock, cross_entropy
from megalite.model.ops import describe_backends

__all__ = [
    "IGNORE_INDEX",
    "Llama",
    "TransformerBlock",
    "count_params",
    "cross_entropy",
    "describe_backends",
    "flops_per_token",
    "flops_per_token_6n",
]
