"""Cut the (already TP-sharded) plain model into pipeline stages: a DeepSpeed `PipelineModule`.

The layer list is the model's own order: embedding, the transformer blocks, the final norm, the
head. DeepSpeed partitions it over `pp` stages (`uniform`: balance the number of transformer
blocks; `parameters`: balance parameter counts), so the embedding is always on the first stage and
norm, head and loss on the last; a block count that does not divide by pp is balanced by the same
rule (the first stages take one block more).
With tied embeddings the head is a `TiedLayerSpec` of the embedding: DeepSpeed keeps one copy on
the first and one on the last stage, and sums their gradients every step.
The labels a micro-batch carries to the last stage are (targets, weight): the loss is the mean
over the trained targets times the micro-batch's share of its global batch (`labelled_loss`).
With `data.document_mask` the documents travel with the hidden states, `(h, segments,
positions)` (`pass_documents`): the same layer list, so the same partition and parameter names.

The model reaches here on the meta device: `stage_bounds` finds this stage's layers by
DeepSpeed's own partition rule, `parallel.build` materialises only those, and the other stages'
layers stay on meta in DeepSpeed's layer list (no memory). `build_pipeline` checks that DeepSpeed
chose the same bounds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megalite.model.documents import Documents, find_documents
from megalite.model.llama import Llama
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import LossFn, weighted_loss

if TYPE_CHECKING:
    from megalite.parallel.tp_layers import VocabParallelEmbedding

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
    """The model as a flat list of pipeline layers (modules or DeepSpeed layer specs). With
    `model.document_eod` set (data.document_mask) its layers pass the documents on too."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if model.document_eod is not None:
        pass_documents(model, model.document_eod)
    if model.cfg.tie_embeddings:

        def tied_head(
            embed: nn.Embedding | VocabParallelEmbedding, h: torch.Tensor
        ) -> torch.Tensor:
            return F.linear(head_entry(h), embed.weight)  # (b, s, vocab / tp)

        first = TiedLayerSpec(EMBED_KEY, Prebuilt, model.embed)
        last = TiedLayerSpec(EMBED_KEY, Prebuilt, model.embed, forward_fn=tied_head)
    else:
        first, last = LayerSpec(Prebuilt, model.embed), model.head
    return [first, *model.layers, model.norm, last]


# What a block layer takes and gives under data.document_mask: h (b, s, dim) (b, s / tp, dim
# under sequence parallelism), the documents' segments and positions (b, s) int64.
Carried = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pass_documents(model: Llama, eod_id: int) -> None:
    """data.document_mask under a pipeline: the embedding's forward also returns the documents of
    its tokens (`find_documents`; only the first stage sees the tokens), each block's takes
    `(h, segments, positions)` and returns them with its new h, the final norm's drops them.

    DeepSpeed sends a stage's tuple of tensors to the next one and sends gradients back for its
    floating-point tensors only, so the int64 documents need none (with TP, its pipe partitioning
    splits the first tensor, h, and sends the others whole). Forwards are wrapped, not modules
    (as activation checkpointing does), so the layer list, its partition and the parameter names
    in checkpoints are those of a run without the mask. In place; once per model."""
    last: list[Documents] = []  # a stage's Documents of its current micro-batch

    def documents(segments: torch.Tensor, positions: torch.Tensor) -> Documents:
        # One Documents per micro-batch on a stage, not per block: its mask (or flash-attn's
        # offsets and their host sync) is made once. A stage's blocks hand on the same tensors.
        if not last or last[0].segments is not segments or last[0].positions is not positions:
            last[:] = [Documents(segments=segments, positions=positions)]
        return last[0]

    embed = model.embed.forward

    def embed_forward(tokens: torch.Tensor) -> Carried:
        found = find_documents(tokens, eod_id)
        return embed(tokens), found.segments, found.positions

    _set_forward(model.embed, embed_forward)
    for block in model.layers:
        _set_forward(block, _block_forward(block.forward, documents))
    norm = model.norm.forward
    _set_forward(model.norm, lambda x: norm(x[0]))


def _block_forward(
    forward: Callable[[torch.Tensor, Documents], torch.Tensor],
    documents: Callable[[torch.Tensor, torch.Tensor], Documents],
) -> Callable[[Carried], Carried]:
    def carried(x: Carried) -> Carried:
        h, segments, positions = x
        return forward(h, documents(segments, positions)), segments, positions  # h (b, s, dim)

    return carried


def _set_forward(module: nn.Module, forward: Callable) -> None:
    module.forward = forward


def layer_module(entry: object) -> nn.Module | None:
    """The module a pipeline layer entry holds (a module, or a layer spec of `Prebuilt`)."""
    from deepspeed.pipe import LayerSpec

    if isinstance(entry, LayerSpec):
        return entry.module_args[0]
    return entry if isinstance(entry, nn.Module) else None


def stage_bounds(layers: list, *, pp: int, stage: int, partition: str) -> tuple[int, int]:
    """[start, stop) of `stage`'s layers in `layers`, by DeepSpeed's partition rule (weights per
    layer, balanced by `deepspeed.runtime.utils.partition_balanced`), computed on meta."""
    from deepspeed.runtime.utils import partition_balanced

    method = PARTITION_METHODS[partition]
    modules = [layer_module(entry) for entry in layers]
    if method == "parameters":
        weights = [
            sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0
            for m in modules
        ]
    else:  # "type:<class name>"
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [int(m is not None and bool(pattern.search(type(m).__name__))) for m in modules]
    parts = partition_balanced(weights=weights, num_parts=pp)
    return parts[stage], parts[stage + 1]


Labels = tuple[torch.Tensor, torch.Tensor]  # targets (b, s), weight () fp32


def labelled_loss(loss_fn: LossFn) -> Callable[[torch.Tensor, Labels], torch.Tensor]:
    """The last stage's loss of logits and labels (targets, weight): `weighted_loss`. The weight
    travels with the targets because only the last stage's loss sees the labels, one micro-batch
    at a time, and each micro-batch has its own (the trainer's `pairs` packs them)."""

    def loss(logits: torch.Tensor, labels: Labels) -> torch.Tensor:
        targets, weight = labels
        return weighted_loss(loss_fn, logits, targets, weight)

    return loss


def build_pipeline(
    layers: list,
    dims: ParallelDims,
    *,
    loss_fn: LossFn,
    partition: str,
    bounds: tuple[int, int],
) -> nn.Module:
    """A `deepspeed.pipe.PipelineModule` holding this rank's stage: `layers[bounds[0]:bounds[1]]`,
    already materialised; its loss is `labelled_loss(loss_fn)`."""
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    pipe = PipelineModule(
        layers=layers,
        topology=topology,
        loss_fn=labelled_loss(loss_fn),
        partition_method=PARTITION_METHODS[partition],
    )
    chosen = (pipe.parts[dims.pp_rank], pipe.parts[dims.pp_rank + 1])
    if chosen != tuple(bounds):
        raise RuntimeError(
            f"DeepSpeed put layers {chosen} on pipeline stage {dims.pp_rank}, megalite built "
            f"{tuple(bounds)}: this DeepSpeed partitions differently; pin deepspeed==0.19.8"
        )
    return pipe
