"""Initial weights drawn unit by unit, so any rank can draw exactly the part it holds.

Every weight matrix is a stack of units — its rows, or for the residual outputs `attn.wo` and
`mlp.w2` (cut by columns under tensor parallelism) its columns — and unit `u` of every parameter
is drawn from its own generator seeded `rules[name].seed + u`. The seeds of all units of a model
are consecutive and distinct (a 70b model has ~8M units of the 2^32 seeds), so no two units
share a stream. A tensor-parallel shard, a pipeline stage or a ZeRO partition draws only its own
units and gets, bit for bit, the values the single-process build has there: the draws are made on
the CPU, one contiguous unit at a time, whatever the target device (a GPU shard is allocated on
the GPU and filled a chunk of units at a time from a small CPU staging buffer).

Values: weights ~ N(0, init_std); the residual outputs use init_std / sqrt(2 * n_layers) so the
residual stream's variance stays bounded with depth; norm gains are 1.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from megalite.config import ModelConfig

SEEDS = 2**32  # torch's CPU generator keeps 32 bits of a seed
RESIDUAL_OUTPUTS = ("attn.wo.weight", "mlp.w2.weight")


@dataclass(frozen=True)
class Rule:
    """How one plain parameter's initial values are drawn."""

    shape: tuple[int, ...]  # the full (unsharded) shape
    std: float | None  # None: ones (a norm's gain)
    axis: int = 0  # units are rows (0) or columns (1)
    seed: int = 0  # unit u's generator seed: (seed + u) mod 2^32

    @property
    def units(self) -> int:
        return self.shape[self.axis]


def base_seed(seed: int) -> int:
    """The run's seed spread over the 2^32 seeds (nearby run seeds get far-apart ranges)."""
    digest = hashlib.blake2b(f"megalite-init:{seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def init_rules(cfg: ModelConfig, seed: int) -> dict[str, Rule]:
    """A rule per parameter of `Llama(cfg)`, by plain name, in the model's parameter order."""
    from megalite.model.llama import Llama

    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    rules: dict[str, Rule] = {}
    next_seed = base_seed(seed)
    for name, p in Llama(cfg, device="meta").named_parameters():
        if p.ndim == 1:
            rules[name] = Rule(tuple(p.shape), None)
            continue
        residual = name.endswith(RESIDUAL_OUTPUTS)
        rule = Rule(tuple(p.shape), out_std if residual else std, int(residual), next_seed)
        rules[name] = rule
        next_seed = (next_seed + rule.units) % SEEDS
    return rules


@torch.no_grad()
def draw_into(out: torch.Tensor, rule: Rule, start: int) -> None:
    """Fill `out` with units [start, start + n) of `rule`'s full tensor (n = out's extent along
    the rule's axis; the other extents are the full ones). `out` may live on any device and have
    any dtype: an fp32 contiguous CPU target is drawn in place, any other is drawn on the CPU into
    a staging buffer of at most `STAGING_BYTES` and copied over a chunk of units at a time."""
    if rule.std is None:
        out.fill_(1.0)
        return
    units = out if rule.axis == 0 else out.transpose(0, 1)  # (n, unit_len)
    n, unit_len = units.shape[0], math.prod(units.shape[1:])
    generator = torch.Generator()
    if out.device.type == "cpu" and out.dtype == torch.float32 and units.is_contiguous():
        for i in range(n):
            _draw_unit(units[i], rule, start + i, generator)
        return
    chunk = max(1, min(n, STAGING_BYTES // (4 * max(1, unit_len))))
    staging = torch.empty((chunk, *units.shape[1:]), dtype=torch.float32)
    for first in range(0, n, chunk):
        rows = min(chunk, n - first)
        for i in range(rows):
            _draw_unit(staging[i], rule, start + first + i, generator)
        units[first : first + rows].copy_(staging[:rows])


STAGING_BYTES = 16 << 20  # the CPU scratch for a target that is not drawn in place


def _draw_unit(target: torch.Tensor, rule: Rule, unit: int, generator: torch.Generator) -> None:
    assert rule.std is not None  # `draw_into` fills a gain (std None) without drawing
    generator.manual_seed((rule.seed + unit) % SEEDS)
    target.normal_(mean=0.0, std=rule.std, generator=generator)
