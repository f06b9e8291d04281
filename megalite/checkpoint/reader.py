"""Read a committed megalite checkpoint of any kind as full tensors of the plain model.

`open_checkpoint(path)` is the one entry point of the tools: it checks the folder (the kind
meta.json names, every file there, sizes and CRC-32) and returns a `Checkpoint` — a
`CheckpointReader` for DeepSpeed's native files, or a `UniversalReader` for a layout-free one
(universal.py: written by `reshard` and `from-hf`, one safetensors file per tensor and kind).

A native checkpoint holds, per model-parallel rank (a (pp, tp) pair), DeepSpeed's files, in one
of four forms (`bf16_` prefixes the optimizer files under bf16; the fp32 master weights are what
we read):
- ZeRO 1/2: flat fp32 partitions of weights and Adam moments, one file per DP rank, each
  parameter's fragment in `param_slice_mappings`;
- ZeRO 3: per DP rank, flat partitions made of every parameter's ceil(numel/dp) slice in
  `param_shapes` order (model states per DP rank too);
- ZeRO 0, fp32: the weights in the module state dict and the torch optimizer's state;
- ZeRO 0, bf16: DeepSpeed's unfused mixed-precision optimizer, whose `fp32_groups` hold the master
  weights in the optimizer's parameter order.
This module undoes all three cuts — DP partitions (concatenate the fragments), TP shards
(`TPShard.merge`, driven by the shard specs in meta.json) and pipeline stages (module names such as
`3.attn.wq.weight` back to `layers.2.attn.wq.weight`) — and yields one plain tensor at a time.
Files are memory-mapped, so peak memory stays near one tensor's shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch

from megalite.checkpoint import store
from megalite.checkpoint.store import CheckpointError
from megalite.checkpoint.universal import (
    FORMAT,
    KINDS,
    LAYOUT_FREE,
    RESUME_KEYS,
    is_universal,
    read_tensor,
    saved_kinds,
    tensor_file,
)
from megalite.config import ModelConfig
from megalite.model.llama import Llama
from megalite.parallel.placement import TPShard


class Checkpoint(Protocol):
    """What the tools read from a checkpoint of either kind."""

    path: Path
    meta: dict[str, Any]
    model: ModelConfig
    description: str  # "a native tp=2 pp=1 dp=2 checkpoint", "a layout-free checkpoint (…)"
    layout_free: bool
    dp: int  # the data-parallel size it was saved (native) or written (layout-free) for
    kinds: tuple[str, ...]  # of KINDS, those it holds

    def names(self) -> list[str]: ...

    def tensors(self, kind: str = "param") -> Iterator[tuple[str, torch.Tensor]]: ...

    def step_count(self) -> int: ...

    def resume_state(self) -> dict[str, Any]: ...


def open_checkpoint(ckpt: str | Path) -> Checkpoint:
    """The reader for checkpoint `ckpt` of either kind, its files checked first."""
    path = Path(ckpt)
    meta = verify_checkpoint(path)
    reader = UniversalReader if is_universal(meta) else CheckpointReader
    return reader(path, meta=meta)


def describe(path: Path, meta: dict[str, Any]) -> str:
    """The kind of checkpoint `meta` names, in words; refuses a kind this megalite cannot read."""
    if is_universal(meta):
        return LAYOUT_FREE
    if "format" in meta:
        raise CheckpointError(
            f"{path}: meta.json names format {meta['format']!r}, which this megalite does not "
            f"read: it reads native checkpoints (no format) and {FORMAT!r} (reshard/from-hf)"
        )
    layout = meta.get("layout") or {}
    if not all(k in layout for k in ("tp", "pp", "dp")):
        return "a native checkpoint"
    return f"a native tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} checkpoint"


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """meta.json after checking, in one process, that it names a kind this megalite reads and
    that every file is there (a missing one named with the kind: which folder lacks what), then
    sizes and CRC-32 (`store.verify`)."""
    meta = _meta_json(path)
    if meta is not None:  # else store.verify says what is wrong with meta.json
        what = describe(path, meta)
        missing = [rel for rel in _expected_files(meta) if not (path / rel).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{path}: {what} is missing {_file_words(meta, missing[0])}{more}"
            )
    return store.verify(path)


def _meta_json(path: Path) -> dict[str, Any] | None:
    """meta.json as written, None where it is absent or unreadable (store.verify says so); one
    that megalite did not write is refused."""
    try:
        meta = json.loads((path / store.META).read_text())
    except (OSError, ValueError):
        return None
    lacking = [k for k in ("files", "model", "step") if not isinstance(meta, dict) or k not in meta]
    if lacking:
        raise CheckpointError(
            f"{path}: its meta.json has no {', '.join(lacking)}: not a checkpoint megalite wrote "
            "(expected a native one or a layout-free one)"
        )
    return meta


def _expected_files(meta: dict[str, Any]) -> list[str]:
    """The files meta.json records, and for a layout-free checkpoint every tensor file its
    model and kinds call for (sorted, without duplicates)."""
    files = set(meta["files"])
    if is_universal(meta):
        names = plain_names(ModelConfig(**meta["model"]))
        files.update(tensor_file(n, kind) for kind in saved_kinds(meta) for n in names)
    return sorted(files)


def _file_words(meta: dict[str, Any], rel: str) -> str:
    """How an error names file `rel` of a checkpoint with `meta`."""
    return f"its tensor file {rel}" if is_universal(meta) and rel.startswith("tensors/") else rel


def plain_names(model: ModelConfig) -> list[str]:
    """The plain model's parameter names, in its order."""
    return [name for name, _ in Llama(model, device="meta").named_parameters()]


@dataclass(frozen=True)
class Local:
    """Where one module parameter of one model-parallel rank lives."""

    pp_rank: int
    tp_rank: int
    module_name: str


class CheckpointReader:
    """A native checkpoint: DeepSpeed's files of one tp × pp × dp layout (see the module doc)."""

    layout_free = False
    kinds: tuple[str, ...] = KINDS

    def __init__(self, ckpt: str | Path, *, meta: dict[str, Any] | None = None) -> None:
        """`meta`: as `verify_checkpoint` returned it (else checked here: every file's CRC-32,
        since a tool reads them all)."""
        self.path = Path(ckpt)
        self.meta = meta if meta is not None else verify_checkpoint(self.path)
        self.description = describe(self.path, self.meta)
        if is_universal(self.meta):
            raise CheckpointError(f"{self.path}: {LAYOUT_FREE}: read it with open_checkpoint")
        self.model = ModelConfig(**self.meta["model"])
        layout = self.meta["layout"]
        if not all(k in layout for k in ("tp", "pp", "dp")):
            raise CheckpointError(f"{self.path}: {self.description} without a tp/pp/dp layout")
        self.tp, self.pp, self.dp = layout["tp"], layout["pp"], layout["dp"]
        self.specs = {k: TPShard(**{**v, "names": tuple(v["names"])}) for k, v in
                      self.meta.get("tp_shards", {}).items()}  # fmt: skip
        files = self.meta["files"]
        self.zero3 = "zero_pp_rank_0_mp_rank_00_model_states.pt" in files
        self.optim_prefix = (
            "bf16_" if "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in files else ""
        )
        self.zero = (
            self.zero3 or f"{self.optim_prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
        )
        self._index = self._build_index()

    # ---- naming -------------------------------------------------------------------------

    def _mp_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def plain_base(self, module_name: str) -> str:
        """The plain name a module parameter stands for (the first, for a fused gate/up)."""
        name = module_name.replace("mlp.w13.weight", "mlp.w1.weight")
        if self.pp == 1:
            return name
        if name.startswith("tied_modules.embed."):
            return "embed.weight"
        index, _, rest = name.partition(".")
        i, n = int(index), self.model.n_layers
        if i == 0:
            return f"embed.{rest}"
        if i <= n:
            return f"layers.{i - 1}.{rest}"
        return f"norm.{rest}" if i == n + 1 else f"head.{rest}"

    def _build_index(self) -> dict[str, list[Local]]:
        """plain base name → its locals on TP ranks 0..tp-1 (first pipeline stage holding it),
        in the plain model's parameter order."""
        index: dict[str, list[Local]] = {}
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                for module_name in self._param_shapes(pp_rank, tp_rank):
                    base = self.plain_base(module_name)
                    locs = index.setdefault(base, [])
                    if len(locs) < self.tp and all(loc.tp_rank != tp_rank for loc in locs):
                        locs.append(Local(pp_rank, tp_rank, module_name))
        order = {name: i for i, name in enumerate(plain_names(self.model))}
        return dict(sorted(index.items(), key=lambda kv: order[kv[0]]))

    def names(self) -> list[str]:
        """Every plain parameter name, in the plain model's order."""
        out: list[str] = []
        for base in self._index:
            spec = self.specs.get(base)
            out.extend(spec.names if spec else (base,))
        return out

    # ---- files ----------------------------------------------------------------------------

    def _load(self, filename: str) -> Any:
        """Memory-map a file anew each time (not cached): pages of a mapping that is kept stay in
        this process's resident set, so peak memory would grow to the checkpoint's size."""
        path = self.path / filename
        if not path.is_file():
            raise CheckpointError(f"{self.path}: {self.description} is missing {filename}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # a truncated zip, a garbled pickle
            raise CheckpointError(f"{self.path}: cannot read {filename}: {e}") from e

    def _model_states(self, pp_rank: int, tp_rank: int) -> dict[str, Any]:
        mp = self._mp_rank(pp_rank, tp_rank)
        if self.zero3:
            return self._load(f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
        return self._load(f"mp_rank_{mp:02d}_model_states.pt")

    def _zero_optim(self, dp_rank: int, mp: int) -> dict[str, Any]:
        name = f"{self.optim_prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
        return self._load(name)["optimizer_state_dict"]

    @cache  # noqa: B019 (small; one reader per conversion)
    def _param_shapes(self, pp_rank: int, tp_rank: int) -> dict[str, torch.Size]:
        states = self._model_states(pp_rank, tp_rank)
        if self.zero:
            return {k: v for group in states["param_shapes"] for k, v in group.items()}
        return {k: v.shape for k, v in self._module_state(pp_rank, tp_rank).items()}

    def _module_state(self, pp_rank: int, tp_rank: int) -> dict[str, torch.Tensor]:
        if self.pp == 1:
            return self._model_states(pp_rank, tp_rank)["module"]
        out = {}
        for f in sorted(self.path.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
            layer = int(f.name.split("-")[0].split("_")[1])
            state = self._load(f.name)
            out.update({f"{layer}.{k}": v for k, v in state.items()})
        return out

    # ---- tensors --------------------------------------------------------------------------

    def _local(self, loc: Local, kind: str) -> torch.Tensor:
        """One TP shard, detached (DeepSpeed saves some flat partitions as Parameters)."""
        shape = self._param_shapes(loc.pp_rank, loc.tp_rank)[loc.module_name]
        if self.zero3:
            return self._zero3_local(loc, kind).detach().view(shape)
        if self.zero:
            return self._zero_local(loc, kind).detach().view(shape)
        optim, index = self._torch_optim(loc)
        if kind != "param":
            return optim["optimizer_state_dict"]["state"][index][kind].view(shape)
        if "fp32_groups" in optim:  # bf16: the fp32 master copy, not the bf16 module weight
            return [p for group in optim["fp32_groups"] for p in group][index].detach().view(shape)
        return self._module_state(loc.pp_rank, loc.tp_rank)[loc.module_name].detach().float()

    def _zero_local(self, loc: Local, kind: str) -> torch.Tensor:
        """Concatenate a parameter's fragments from the DP partitions (ZeRO 1/2)."""
        pieces = []
        mp = self._mp_rank(loc.pp_rank, loc.tp_rank)
        for dp_rank in range(self.dp):
            osd = self._zero_optim(dp_rank, mp)
            for group, mapping in enumerate(osd["param_slice_mappings"]):
                frag = mapping.get(loc.module_name)
                if frag is None:
                    continue
                if kind == "param":
                    flat = osd["single_partition_of_fp32_groups"][group]
                else:
                    flat = osd["base_optimizer_state"]["state"][group][kind]
                pieces.append(flat[frag.start : frag.start + frag.numel])
        return torch.cat(pieces)

    def _zero3_local(self, loc: Local, kind: str) -> torch.Tensor:
        """Concatenate a parameter's ceil(numel/dp) slices from the DP partitions (ZeRO 3), at
        the offset the parameters before it (in `param_shapes` order) take in each partition."""
        offset, numel = 0, 0
        for name, shape in self._param_shapes(loc.pp_rank, loc.tp_rank).items():
            numel = shape.numel()
            if name == loc.module_name:
                break
            offset += -(-numel // self.dp)
        part = -(-numel // self.dp)
        pieces = []
        for dp_rank in range(self.dp):
            osd = self._zero_optim(dp_rank, self._mp_rank(loc.pp_rank, loc.tp_rank))
            if kind == "param":
                flats = osd["fp32_flat_groups"]
            else:
                state = osd["optimizer_state_dict"]["state"]
                flats = [state[i][kind] for i in range(len(state))]
            pieces.append(_span(flats, offset, part))
        return torch.cat(pieces)[:numel]

    def _torch_optim(self, loc: Local) -> tuple[dict[str, Any], int]:
        """ZeRO 0: the optimizer's state dict (torch's AdamW's, under `optimizer_state_dict`
        when DeepSpeed wraps it for bf16) and this parameter's index in it. Indices follow
        `param_groups`: sorted names, matrices then vectors (see parallel/engine.py)."""
        optim = self._model_states(loc.pp_rank, loc.tp_rank)["optimizer"]
        if "optimizer_state_dict" not in optim:
            optim = {"optimizer_state_dict": optim}
        shapes = self._param_shapes(loc.pp_rank, loc.tp_rank)
        ordered = sorted(shapes)
        order = [n for n in ordered if len(shapes[n]) >= 2] + [
            n for n in ordered if len(shapes[n]) < 2
        ]
        return optim, order.index(loc.module_name)

    def step_count(self) -> int:
        """The optimizer's step counter."""
        if self.zero:
            osd = self._zero_optim(0, 0)
            base = osd["optimizer_state_dict" if self.zero3 else "base_optimizer_state"]
            return int(base["state"][0]["step"])
        optim = self._model_states(0, 0)["optimizer"]
        state = optim.get("optimizer_state_dict", optim)["state"]
        return int(next(iter(state.values()))["step"]) if state else 0

    def resume_state(self) -> dict[str, Any]:
        """What a run resuming from this state needs besides the tensors (RESUME_KEYS): the
        optimizer step, the LR schedule, DeepSpeed's counters, rank 0's data-stream position."""
        rank0 = self._load(store.rank_file(0))
        model_states = self._model_states(0, 0)
        return {
            "optimizer_step": self.step_count(),
            "lr_scheduler": model_states.get("lr_scheduler"),
            "global_steps": model_states.get("global_steps", self.meta["step"]),
            "global_samples": model_states.get("global_samples", 0),
            "rank_state": {k: v for k, v in rank0.items() if k != "rng"},
        }

    def tensors(self, kind: str = "param") -> Iterator[tuple[str, torch.Tensor]]:
        """(plain name, full fp32 tensor) for every parameter, one at a time."""
        _check_kind(kind)
        for base, locs in self._index.items():
            spec = self.specs.get(base)
            if spec is None:
                yield base, self._local(locs[0], kind).clone()
                continue
            parts = [self._local(loc, kind) for loc in sorted(locs, key=lambda x: x.tp_rank)]
            yield from spec.merge(parts).items()


def _span(flats: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """Elements [offset, offset + numel) of the concatenation of `flats`, without building it."""
    pieces = []
    for flat in flats:
        if offset < flat.numel() and numel > 0:
            piece = flat[offset : offset + numel]
            pieces.append(piece)
            numel -= piece.numel()
        offset = max(0, offset - flat.numel())
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {KINDS}")


class UniversalReader:
    """A layout-free checkpoint (universal.py): every parameter's full fp32 weight and Adam
    moments in a safetensors file of its own, read one tensor at a time."""

    layout_free = True
    description = LAYOUT_FREE

    def __init__(self, ckpt: str | Path, *, meta: dict[str, Any] | None = None) -> None:
        """`meta`: as `verify_checkpoint` returned it (else checked here)."""
        self.path = Path(ckpt)
        self.meta = meta if meta is not None else verify_checkpoint(self.path)
        if not is_universal(self.meta):
            raise CheckpointError(f"{self.path}: {describe(self.path, self.meta)}, not "
                                  f"{LAYOUT_FREE}: read it with open_checkpoint")  # fmt: skip
        self.model = ModelConfig(**self.meta["model"])
        self.layout: dict[str, int] = dict(self.meta.get("layout") or {})  # the one written for
        self.dp = int(self.layout.get("dp", 1))
        self.kinds = saved_kinds(self.meta)

    def names(self) -> list[str]:
        """Every plain parameter name, in the plain model's order."""
        return plain_names(self.model)

    def tensors(self, kind: str = "param") -> Iterator[tuple[str, torch.Tensor]]:
        """(plain name, full fp32 tensor) for every parameter, one at a time."""
        _check_kind(kind)
        if kind not in self.kinds:
            raise CheckpointError(
                f"{self.path}: {LAYOUT_FREE} of weights only (from-hf): it holds no {kind}"
            )
        for name in self.names():
            yield name, read_tensor(self.path, name, kind)

    def step_count(self) -> int:
        """The optimizer's step counter."""
        return int(self.meta.get("optimizer_step", 0))

    def resume_state(self) -> dict[str, Any]:
        """RESUME_KEYS, as saved (see CheckpointReader.resume_state)."""
        return {k: self.meta.get(k) for k in RESUME_KEYS}
