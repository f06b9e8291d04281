"""Layout-free checkpoints: every parameter's full fp32 weight and Adam moments, by plain name.

`write_universal` turns a checkpoint of any kind into one (tensor by tensor, through
`reader.open_checkpoint`, which also reads these back); `load_universal` puts one into a freshly
built engine of any layout: each rank reads only its TP shard's slices of the full tensors
(`read_shard`, as `placement.TPShard` cuts them) and DeepSpeed's fragment API places it in the
ZeRO partition this DP rank owns. The data-stream position is DP-invariant (see
data/stream.py), so one saved position serves every new rank.

Folder: `meta.json` (format, step, tokens, model, target layout, optimizer step, LR scheduler and
data-stream state, file sizes and CRC-32) and `tensors/<plain name>.<kind>.safetensors`. One that
`from-hf` writes holds weights only (`optimizer_state: false`: no Adam moments, no LR schedule, no
data position), plus the Hugging Face folder's tokenizer files and `model.yaml`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megalite.checkpoint import store, training
from megalite.parallel import deepspeed_compat
from megalite.parallel.placement import Piece, TPShard, shard_of

log = logging.getLogger("megalite")

if TYPE_CHECKING:  # reader.py imports this module (the format) to read these checkpoints
    from megalite.checkpoint.reader import Checkpoint

FORMAT = "megalite-universal-1"
LAYOUT_FREE = "a layout-free checkpoint (written by reshard/from-hf)"
KINDS = ("param", "exp_avg", "exp_avg_sq")  # a parameter's fp32 weight and Adam moments
# What a layout-free checkpoint carries over for a run to resume with (see `resume_state`).
RESUME_KEYS = ("optimizer_step", "lr_scheduler", "global_steps", "global_samples", "rank_state")


def is_universal(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def saved_kinds(meta: dict[str, Any]) -> tuple[str, ...]:
    """The kinds a layout-free checkpoint holds: all, or only weights (from-hf's)."""
    return KINDS if meta.get("optimizer_state", True) else ("param",)


def tensor_file(name: str, kind: str) -> str:
    return f"tensors/{name}.{kind}.safetensors"


def write_universal(
    src: str | Path,
    dst: str | Path,
    *,
    layout: dict[str, int],
    kinds: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `dst` (must not exist) from checkpoint `src` (native or layout-free), for a run with
    `layout`: every kind `src` holds (weights only from a from-hf import), or only `kinds` of them
    (`("param",)`: weights for trainer.init_from), one tensor at a time."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megalite.checkpoint.reader import open_checkpoint

    reader = open_checkpoint(src)
    dst = Path(dst)
    names = reader.names()
    kinds = tuple(k for k in reader.kinds if kinds is None or k in kinds)
    bar = tqdm(total=len(names) * len(kinds), desc="reshard", unit="tensor",
               disable=not progress)  # fmt: skip
    total = 0
    with store.staging(dst) as tmp:
        (tmp / "tensors").mkdir()
        for kind in kinds:
            for name, t in reader.tensors(kind):
                save_file({"t": t.contiguous()}, tmp / tensor_file(name, kind))
                total += t.numel() * t.element_size()
                bar.update()
        bar.close()
        _copy_extras(reader, tmp)
        meta = _universal_meta(reader, layout, kinds=kinds)
        write_meta(tmp, meta)
    return {"tensors": len(names), "kinds": kinds, "bytes": total, "dst": str(dst)}


def _copy_extras(reader: Checkpoint, folder: Path) -> None:
    """A layout-free source's files besides its tensors (from-hf's `model.yaml` and tokenizer)."""
    if not reader.layout_free:
        return
    for rel in store.list_files(reader.path):
        if not rel.startswith("tensors/"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(reader.path / rel, folder / rel)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """meta.json last, with every file's size and CRC-32 (checked on load)."""
    meta["files"] = {rel: store.file_entry(folder / rel) for rel in store.list_files(folder)}
    (folder / store.META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _universal_meta(
    reader: Checkpoint, layout: dict[str, int], *, kinds: tuple[str, ...]
) -> dict[str, Any]:
    src = reader.meta
    # The run's (none for imported weights; init_from: where its weights came from); from-hf's
    # Hugging Face folder and EOS id.
    keep = ("data_path", "config", "wandb_run_id", "zero_stage", "source", "eos_token_id",
            "init_from")  # fmt: skip
    return {
        "format": FORMAT,
        "step": src["step"],
        "consumed_tokens": src["consumed_tokens"],
        "model": src["model"],
        "layout": layout,
        # The layout of the run that trained it (none for imported weights).
        "source_layout": src.get("source_layout") if reader.layout_free else src["layout"],
        **{k: src.get(k) for k in keep},
        "precision": src.get("precision", "fp32"),
        "optimizer_state": kinds == KINDS,
        **reader.resume_state(),
        "tp_shards": {},
    }


# ---- loading into an engine --------------------------------------------------------------


def read_tensor(ckpt: Path, name: str, kind: str) -> torch.Tensor:
    """One full tensor of layout-free checkpoint `ckpt`; a missing or unreadable file is a
    CheckpointError naming it."""
    with _opened(ckpt, name, kind) as t:
        return t[:]


def read_shard(
    ckpt: Path, shard: TPShard, kind: str, *, tp: int, rank: int
) -> tuple[torch.Tensor, int]:
    """TP rank `rank`'s shard of one parameter of layout-free checkpoint `ckpt`, reading only its
    pieces of the full tensors (safetensors slices of the memory-mapped files); also returns the
    bytes read."""
    with ExitStack() as stack:
        sliced = {n: stack.enter_context(_opened(ckpt, n, kind)) for n in shard.names}
        shapes = {n: tuple(t.get_shape()) for n, t in sliced.items()}
        read = 0

        def fill(piece: Piece, region: torch.Tensor) -> None:
            nonlocal read
            span = slice(piece.start, piece.start + piece.real_size)
            t = sliced[piece.name][span] if piece.axis == 0 else sliced[piece.name][:, span]
            region.copy_(t)
            read += t.numel() * t.element_size()

        out = torch.empty(shard.shape(shapes, tp=tp, rank=rank), dtype=torch.float32)
        extents = {n: shape[shard.axis] for n, shape in shapes.items()}
        return shard.assemble(out, fill, extents, tp=tp, rank=rank), read


@contextmanager
def _opened(ckpt: Path, name: str, kind: str) -> Iterator[Any]:
    """The safetensors slice of one tensor file; errors name the file."""
    from safetensors import SafetensorError, safe_open

    rel = tensor_file(name, kind)
    if not (ckpt / rel).is_file():
        raise store.CheckpointError(f"{ckpt}: {LAYOUT_FREE} is missing its tensor file {rel}")
    try:
        with safe_open(ckpt / rel, framework="pt") as f:
            yield f.get_slice("t")
    except (SafetensorError, KeyError, OSError) as e:
        raise store.CheckpointError(f"{ckpt}: cannot read {rel}: {e}") from e


def load_universal(
    engine: Any, ckpt: Path, *, tp: int, tp_rank: int, verify: bool = True
) -> dict[str, Any]:
    """Fill `engine` (any layout) from universal checkpoint `ckpt`, verified first (unless the
    caller just did); returns the saved rank state. Collective."""
    if verify:
        training.verify_shared(ckpt)
    meta = store.read_meta(ckpt)
    step = float(meta["optimizer_step"])
    read = _place_tensors(engine, ckpt, kinds=saved_kinds(meta), step=step, tp=tp, tp_rank=tp_rank)
    log.info("layout-free resume: read %d bytes of %s (this rank's slices)", read, ckpt)
    if meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # The schedule writes the lr into the optimizer only when it steps: do it now.
        for group, lr in zip(
            engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    return meta["rank_state"]


def load_weights(engine: Any, ckpt: Path, *, tp: int, tp_rank: int, verify: bool = True) -> None:
    """Fill `engine`'s weights (any layout) from universal checkpoint `ckpt` and nothing else:
    Adam moments zero at step 0, the engine's own fresh LR schedule and counters, whatever else
    `ckpt` holds (trainer.init_from). Collective."""
    if verify:
        training.verify_shared(ckpt)
    read = _place_tensors(engine, ckpt, kinds=("param",), step=0.0, tp=tp, tp_rank=tp_rank)
    log.info("init_from: read %d bytes of weights of %s (this rank's slices)", read, ckpt)


def _place_tensors(
    engine: Any, ckpt: Path, *, kinds: tuple[str, ...], step: float, tp: int, tp_rank: int
) -> int:
    """Put this rank's slices of the `kinds` of `ckpt` into `engine` (the kinds left out as
    zeros, Adam's state at `step`); returns the bytes read."""
    place = _placer(engine.optimizer, step=step)
    read = 0
    for p in engine.module.parameters():
        shard = shard_of(p)
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO 3 keeps only a partition in p
        values = {}
        for kind in KINDS:
            if kind not in kinds:
                values[kind] = torch.zeros(shape, dtype=torch.float32)
                continue
            values[kind], n = read_shard(ckpt, shard, kind, tp=tp, rank=tp_rank)
            values[kind] = values[kind].reshape(shape)
            read += n
        place(p, values)
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):  # ZeRO 3: module ← fp32
        deepspeed_compat.refresh_zero3_partitions(engine.optimizer)
    return read


Placer = Callable[[torch.nn.Parameter, dict[str, torch.Tensor]], None]


def _placer(optimizer: Any, *, step: float) -> Placer:
    """A function that puts one parameter's full-shape (this TP rank's) fp32 weight and Adam
    moments where `optimizer` keeps them, after creating the Adam state that torch and DeepSpeed
    create lazily at the first step. Four optimizers, as in reader.py: ZeRO 1/2 (fp32 partitions
    with per-parameter fragments), ZeRO 3 (fp32 partitions of ceil(numel/dp) slices), DeepSpeed's
    unfused bf16 optimizer without ZeRO (an fp32 master per parameter), plain torch AdamW."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    def adam_state(like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(step),
            "exp_avg": torch.zeros_like(like),
            "exp_avg_sq": torch.zeros_like(like),
        }

    zero_flats = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    zero_flats = getattr(optimizer, "fp32_partitioned_groups_flat", zero_flats)  # ZeRO 3
    if zero_flats is not None:
        for flat in zero_flats:
            optimizer.optimizer.state[flat] = adam_state(flat)
        if hasattr(optimizer, "single_partition_of_fp32_groups"):
            deepspeed_compat.relink_zero12_optimizer_state(optimizer)

        def place_zero(p: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
            if not hasattr(p, "ds_shape"):  # ZeRO 3 copies all fp32 partitions in at the end
                with torch.no_grad():
                    p.copy_(values["param"].to(p.dtype))
            safe_set_full_fp32_param(p, values["param"])
            for kind in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, values[kind], kind)

        return place_zero

    masters = {}  # bf16 without ZeRO: parameter → its fp32 master, which the optimizer steps
    if hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            masters.update({id(p): m for p, m in zip(low, high, strict=True)})
    base = optimizer.optimizer if masters else optimizer

    def place_torch(p: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        master = masters.get(id(p), p)
        with torch.no_grad():
            p.copy_(values["param"].to(p.dtype))
            master.copy_(values["param"])
        state = base.state[master] = adam_state(master)
        state["exp_avg"].copy_(values["exp_avg"])
        state["exp_avg_sq"].copy_(values["exp_avg_sq"])

    return place_torch
