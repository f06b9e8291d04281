"""`trainer.init_from`: a new run (step 0, fresh optimizer, schedule and data position) that takes
only the model weights of another model — Megatron's `--finetune`, torchtitan's model-only load.

The source may be any megalite checkpoint (native of any layout, or layout-free), a run folder or
its `checkpoints/` folder (their latest), or a Hugging Face Llama folder (config.json +
safetensors). The ranks read weights from a layout-free checkpoint only (`universal.load_weights`,
each rank its own slices): a layout-free source is read where it is; any other is converted once,
by the launcher before a rank starts, into a weights-only layout-free copy under the run folder
(`RUN/init_from/<name>-<key>`, the key naming the source's path and its meta.json or config.json
by size and mtime, so a changed source is converted again and a restarted launch reuses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from megalite.checkpoint import store
from megalite.checkpoint.hf import import_hf, model_config_from_hf
from megalite.checkpoint.reader import describe
from megalite.checkpoint.store import CheckpointError
from megalite.checkpoint.universal import is_universal, write_universal
from megalite.config import ModelConfig

log = logging.getLogger("megalite")
CACHE = "init_from"  # the run folder's sub-folder of converted sources
TOKENIZERS = ("tokenizer.json", "tokenizer.model")  # the files whose bytes a tokenizer is


@dataclass(frozen=True)
class InitSource:
    """What `trainer.init_from` names, as found on disk."""

    path: Path  # the folder named, absolute
    checkpoint: Path | None  # the megalite checkpoint found there; None: a Hugging Face folder
    layout_free: bool
    model: ModelConfig
    tokenizer: Path | None  # the model's tokenizer file, where one is known

    @property
    def described(self) -> Path:
        """The folder whose meta.json (or config.json) describes the weights."""
        return self.checkpoint or self.path


def locate(init_from: str) -> InitSource:
    """The source `init_from` names; a folder that is neither kind is refused in one line."""
    path = Path(init_from).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"trainer.init_from={init_from}: no such folder")
    ckpt = checkpoint_in(path)
    if ckpt is not None:
        meta = store.read_meta(ckpt)
        describe(ckpt, meta)  # refuses a format this megalite does not read
        tokenizer = tokenizer_in(ckpt) or data_tokenizer(meta)
        return InitSource(path, ckpt, is_universal(meta), _model_of(meta), tokenizer)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        model = model_config_from_hf(config, name=path.name)
        return InitSource(path, None, False, model, tokenizer_in(path))
    raise CheckpointError(
        f"trainer.init_from={init_from} is neither a megalite checkpoint (no {store.META}, no "
        "checkpoints/latest) nor a Hugging Face model folder (no config.json)"
    )


def checkpoint_in(path: Path) -> Path | None:
    """A checkpoint folder itself, else the latest of a `checkpoints/` or run folder."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / store.META).is_file():
            return candidate
        found = store.latest(candidate)
        if found is not None:
            return found
    return None


def _model_of(meta: dict[str, Any]) -> ModelConfig:
    """The model shape a checkpoint's meta records (keys this ModelConfig lacks are dropped)."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})


def tokenizer_in(folder: Path) -> Path | None:
    """The tokenizer file of a Hugging Face folder, or the one from-hf kept in a checkpoint."""
    return next((folder / n for n in TOKENIZERS if (folder / n).is_file()), None)


def data_tokenizer(meta: dict[str, Any]) -> Path | None:
    """The tokenizer of the data a megalite run trained on, while that folder is still there."""
    data = meta.get("data_path")
    manifest = Path(data) / "manifest.json" if data else None
    if manifest is None or not manifest.is_file():
        return None
    name = json.loads(manifest.read_text()).get("tokenizer", "tokenizer.json")
    path = manifest.parent / name
    return path if path.is_file() else None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as data/prepare.py records a tokenizer's in the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(store.CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shape_differences(model: ModelConfig, source: InitSource) -> list[str]:
    """The shape fields (all but the name) in which `model` differs from the source's model."""
    have, want = vars(model), vars(source.model)
    return [
        f"{k}={have[k]} (the checkpoint has {want[k]})"
        for k in sorted(want)
        if k != "name" and have.get(k) != want[k]
    ]


def weights_checkpoint(source: InitSource, run_dir: Path) -> Path:
    """The layout-free checkpoint the ranks read: the source itself, or its converted copy."""
    if source.layout_free:
        assert source.checkpoint is not None  # layout-free means a megalite checkpoint
        return source.checkpoint
    marker = source.described / (store.META if source.checkpoint else "config.json")
    stat = marker.stat()
    key = hashlib.sha1(f"{source.described}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return run_dir / CACHE / f"{source.described.name}-{key.hexdigest()[:12]}"


def prepare_weights(
    source: InitSource,
    run_dir: Path,
    *,
    layout: dict[str, int],
    convert: bool = True,
    timeout_s: float = 0.0,
) -> Path:
    """`weights_checkpoint`, converted now if it is not there yet (`convert`: the launcher, or
    rank 0 of an outside launcher's world; the other ranks wait up to `timeout_s` for it)."""
    target = weights_checkpoint(source, run_dir)
    if (target / store.META).is_file():
        return target
    if not convert:
        return _wait_for(target, timeout_s=timeout_s)
    log.info("trainer.init_from: converting %s into %s (once)", source.described, target)
    if source.checkpoint is None:
        import_hf(source.path, target, layout=layout, progress=False)
    else:
        write_universal(source.checkpoint, target, layout=layout, kinds=("param",), progress=False)
    return target


def _wait_for(target: Path, *, timeout_s: float) -> Path:
    """Wait for rank 0's conversion (renamed into place whole; see store.staging)."""
    deadline = time.monotonic() + (timeout_s or float("inf"))
    while not (target / store.META).is_file():
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"trainer.init_from: rank 0 did not write {target} within {timeout_s:.0f}s"
            )
        time.sleep(1.0)
    return target
