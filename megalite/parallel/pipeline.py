"""Cut the (already TP-sharded) plain model into pipeline stages: a DeepSpeed `PipelineModule`.

The layer list is the model's own order: embedding, the transformer blocks, the final norm, the
head. DeepSpeed partitions it over `pp` stages (`uniform`: balance the number of transformer
blocks; `parameters`: balance parameter counts), so the embedding is always on the first stage and
norm, head and loss on the last; a block count that does not divide by pp is balanced by the same
rule (the first stages take one block more).
With tied embeddings the head is a `TiedLayerSpec` of the embedding: DeepSpeed keeps one copy on
the first and one on the last stage, and sums their gradients every step.

Every rank built the whole model with the run's seed, so each stage starts from exactly the
unsharded model's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalite.model.llama import Llama
from megalite.parallel.dims import ParallelDims

EMBED_KEY = "embed"
# Our names → DeepSpeed's partition methods. `uniform` balances transformer blocks (as Megatron
# does), the embedding riding with the first stage and norm + head with the last; `parameters`
# balances parameter counts, so a large vocabulary takes blocks off the first and last stages.
PARTITION_METHODS = {"uniform": "type:TransformerBlock", "parameters": "parameters"}


class Prebuilt(nn.Module):
    """DeepSpeed's LayerSpec takes a module class and arguments; "constructing" this class returns
    the already-built module it is given (so its seeded, sharded weights are kept)."""

    def __new__(cls, module: nn.Module) -> nn.Module:  # type: ignore[misc]
        return module


def bubble_fraction(*, pp: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def stage_layers(model: Llama, *, head_entry: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """The model as a flat list of pipeline layers (modules or DeepSpeed layer specs)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if model.cfg.tie_embeddings:

        def tied_head(embed: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return F.linear(head_entry(h), embed.weight)  # (b, s, vocab / tp)

        first = TiedLayerSpec(EMBED_KEY, Prebuilt, model.embed)
        last = TiedLayerSpec(EMBED_KEY, Prebuilt, model.embed, forward_fn=tied_head)
    else:
        first, last = LayerSpec(Prebuilt, model.embed), model.head
    return [first, *model.layers, model.norm, last]


def build_pipeline(
    model: Llama,
    dims: ParallelDims,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    head_entry: Callable[[torch.Tensor], torch.Tensor],
    partition: str,
) -> nn.Module:
    """A `deepspeed.pipe.PipelineModule` holding this rank's stage."""
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    return PipelineModule(
        layers=stage_layers(model, head_entry=head_entry),
        topology=topology,
        loss_fn=loss_fn,
        partition_method=PARTITION_METHODS[partition],
    )
