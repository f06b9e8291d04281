"""Load a model to generate with, from any folder megalite knows: a checkpoint (native of any
layout, or layout-free from `reshard`/`from-hf`), a run folder or its `checkpoints/` folder (their
latest), or a Hugging Face Llama folder (config.json + safetensors, read without transformers).

`load_model` gives the plain, unsharded `Llama` in eval mode on one device, and the model's
tokenizer: the one `from-hf` kept in the checkpoint folder, else the tokenizer of the data the run
trained on (meta.json's data_path, while that folder exists), or a Hugging Face folder's
tokenizer.json / tokenizer.model. Its end-of-sequence id comes from what travels with the
tokenizer: the data manifest's end-of-document token, else tokenizer_config.json's eos_token, else
the eos_token_id of meta.json (from-hf keeps the HF config's), generation_config.json or
config.json. This interface (`load_model`, `Loaded.model`, `Loaded.tokenizer.encode/decode/eos_id`,
`Loaded.max_seq_len`) is what evaluation harnesses build on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalite.checkpoint import store
from megalite.checkpoint.hf import hf_plain_tensors, model_config_from_hf
from megalite.checkpoint.init_from import checkpoint_in, data_tokenizer, tokenizer_in
from megalite.checkpoint.reader import open_checkpoint
from megalite.checkpoint.store import CheckpointError
from megalite.config import ModelConfig
from megalite.data.encode import EOD_TOKEN, Encoder, TokenizerFile, read_tokenizer_config
from megalite.data.errors import DataError
from megalite.data.manifest import load_manifest
from megalite.data.stats import tokenizer_of
from megalite.model.llama import Llama


class Tokenizer:
    """Text ↔ ids with a model's tokenizer file (a tokenizer.json or a SentencePiece model), no
    special tokens added on encoding; `eos_id` ends a generation (None: none known)."""

    def __init__(self, encoder: Encoder, *, eos_id: int | None, source: Path) -> None:
        self.encoder = encoder
        self.eos_id = eos_id
        self.source = source

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encoder.encode([text])[0]]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included (as text)."""
        return self.encoder.decode(ids)


@dataclass
class Loaded:
    """A model ready to generate: `model` (eval mode), its `tokenizer` (None only when loaded
    with tokenizer=False) and the folder it came from (the checkpoint found, or the HF folder)."""

    model: Llama
    tokenizer: Tokenizer | None
    source: Path

    @property
    def max_seq_len(self) -> int:
        """The longest sequence (prompt plus new tokens) the model takes."""
        return self.model.cfg.max_seq_len


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Loaded:
    """The model at `path` (see the module docstring) on `device` in `dtype`. A folder of
    neither kind, or (with `tokenizer`) a model without a known tokenizer, raises
    CheckpointError in one line."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    ckpt = checkpoint_in(folder)
    if ckpt is not None:
        reader = open_checkpoint(ckpt)
        cfg, tensors, meta = reader.model, reader.tensors("param"), reader.meta
        source = ckpt
    elif (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        cfg = model_config_from_hf(config, name=folder.name)
        tensors, meta, source = hf_plain_tensors(folder, cfg), {}, folder
    else:
        raise CheckpointError(
            f"{path} is neither a megalite checkpoint (no {store.META}, no checkpoints/latest) "
            "nor a Hugging Face model folder (no config.json)"
        )
    tok = _tokenizer(source, meta) if tokenizer else None
    model = _build(cfg, tensors, device=torch.device(device), dtype=dtype, source=source)
    return Loaded(model=model, tokenizer=tok, source=source)


def _build(
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: Path,
) -> Llama:
    """The plain model filled from (plain name, tensor) pairs: allocated empty (no random init),
    every parameter copied in, the tie and the rotary tables restored."""
    model = Llama(cfg, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())  # a tied head is not listed (it is the embedding)
    if cfg.tie_embeddings:
        params.pop("head.weight", None)
    loaded = set()
    with torch.no_grad():
        for name, t in tensors:
            if name not in params:
                raise CheckpointError(f"{source}: unexpected tensor {name}")
            if t.shape != params[name].shape:
                raise CheckpointError(
                    f"{source}: {name} is {tuple(t.shape)}, the model wants "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(t)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:5])}")
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight  # to_empty broke the tie
    model.rope.init_tables(device)
    return model.eval()


def _tokenizer(source: Path, meta: dict[str, Any]) -> Tokenizer:
    """The model's tokenizer (see the module docstring), or one line saying none is known."""
    file = tokenizer_in(source)
    if file is None:
        in_data = data_tokenizer(meta)
        if in_data is None:
            data = meta.get("data_path")
            where = f"and its data folder {data} is gone" if data else "and names no data folder"
            raise CheckpointError(
                f"{source} has no tokenizer (no tokenizer.json or tokenizer.model) {where}: "
                "generate needs one (load_model(..., tokenizer=False) gives ids only)"
            )
        return data_folder_tokenizer(in_data.parent)
    eos_token = read_tokenizer_config(source).eos_token
    # A named EOS token is what its id is; else the id a config names, else the tokenizer's own
    # (a SentencePiece model's EOS piece, or "<|endoftext|>" where a tokenizer.json has it).
    eos_id = None if eos_token is not None else _eos_id(source, meta)
    kind = "sentencepiece" if file.suffix == ".model" else "hf"
    data = file.read_bytes()
    known = eos_token is not None or eos_id is not None
    if kind == "hf" and eos_token is None:
        eos_token = _hf_token(data, EOD_TOKEN if eos_id is None else eos_id)
        if eos_token is None:  # no EOS at all: Encoder wants a token of the vocabulary
            eos_token = _hf_token(data, 0)
            known = False
    try:
        encoder = Encoder(TokenizerFile(kind, data, eos_token), source=str(file))
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if eos_id is None and (known or kind == "sentencepiece"):
        eos_id = encoder.eod_id
    return Tokenizer(encoder, eos_id=eos_id, source=file)


def data_folder_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer a prepared data folder was encoded with (its manifest's), ending sequences at
    its end-of-document token."""
    try:
        manifest = load_manifest(folder)
        encoder = tokenizer_of(manifest)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return Tokenizer(encoder, eos_id=manifest.eod_token_id, source=manifest.tokenizer_path)


def _eos_id(folder: Path, meta: dict[str, Any]) -> int | None:
    """The end-of-sequence id that meta.json, generation_config.json or config.json names (the
    first of a list)."""
    candidates = [meta.get("eos_token_id")]
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            candidates.append(json.loads((folder / name).read_text()).get("eos_token_id"))
    for eos in candidates:
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    return None


def _hf_token(data: bytes, token: int | str) -> str | None:
    """In a tokenizer.json: the string of id `token`, or string `token` if it is in the
    vocabulary (else None)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(data.decode())
    if isinstance(token, str):
        return token if tok.token_to_id(token) is not None else None
    return tok.id_to_token(token)
