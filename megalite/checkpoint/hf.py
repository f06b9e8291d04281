"""Hugging Face Llama ↔ megalite: `export_hf` (any layout → `LlamaForCausalLM` folder) and
`import_hf` (a Llama-family folder → a layout-free megalite checkpoint to continue pretraining).

The plain model is Llama's parameter set with Hugging Face's rotate-half RoPE layout, so the export
is a renaming: no permutation of q/k rows. Tensors are streamed from a checkpoint of either kind
(`reader.open_checkpoint`: native, or layout-free as reshard and import_hf write) one at a
time into safetensors files of at most `max_shard_bytes` (plus an index when there are several),
written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import torch

from megalite.checkpoint import store
from megalite.checkpoint.reader import Checkpoint, open_checkpoint
from megalite.checkpoint.store import CheckpointError
from megalite.config import ModelConfig
from megalite.model.llama import Llama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
# A Hugging Face folder's tokenizer files (and its generation defaults), which import_hf keeps
# and export_hf hands back; the first two are the tokenizer itself.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def hf_name(plain: str) -> str:
    if plain == "embed.weight":
        return "model.embed_tokens.weight"
    if plain == "norm.weight":
        return "model.norm.weight"
    if plain == "head.weight":
        return "lm_head.weight"
    _, index, rest = plain.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{index}.{_LAYER[rest]}"


def hf_config(m: ModelConfig, *, dtype: str, eos_token_id: int | list[int] | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
    }


def narrow(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast, refusing values the narrower type cannot hold (they would become inf)."""
    if dtype != torch.float32 and t.numel():
        limit = torch.finfo(dtype).max
        low, high = torch.aminmax(t)  # no |t| temporary the size of t
        biggest = max(-float(low), float(high))
        if biggest > limit:
            raise CheckpointError(
                f"{name} holds {biggest:.3g}, beyond {dtype} (max {limit:.3g}): use --dtype fp32"
            )
    return t.to(dtype).contiguous()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _plan_files(
    shapes: dict[str, torch.Size], dtype: torch.dtype, max_bytes: int
) -> list[dict[str, torch.Size]]:
    """Split tensors (in order) into files of at most `max_bytes` (a larger tensor alone)."""
    files: list[dict[str, torch.Size]] = [{}]
    size, itemsize = 0, torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append({})
            size = 0
        files[-1][name] = shape
        size += nbytes
    return files


def _safetensors_header(shapes: dict[str, torch.Size], dtype: torch.dtype) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `shapes` in order (the
    tensor bytes follow back to back), padded with spaces to 8 bytes as the reference writer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + shape.numel() * itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_raw(f, t: torch.Tensor) -> None:
    """A contiguous tensor's bytes, little-endian as safetensors stores them, without a copy."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)  # numpy has no bfloat16; the bytes are the same
    f.write(t.numpy().data.cast("B"))


def export_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
) -> dict[str, object]:
    """Write `dst` (must not exist) from checkpoint `src` (native or layout-free); returns a
    summary.

    Each safetensors file is streamed: its header is written from the shapes known up front,
    then every tensor's bytes as the reader produces it, so memory holds one tensor at a time.
    """
    from tqdm import tqdm

    reader = open_checkpoint(src)
    dst = Path(dst)
    torch_dtype = DTYPES[dtype]
    meta_model = dict(Llama(reader.model, device="meta").state_dict(keep_vars=True))
    shapes = {hf_name(n): meta_model[n].shape for n in reader.names()}
    plan = _plan_files(shapes, torch_dtype, max_shard_bytes)
    bar = tqdm(total=len(shapes), desc="to-hf", unit="tensor", disable=not progress)
    tensors = reader.tensors("param")
    files: list[tuple[str, list[str]]] = []
    total = 0
    with store.staging(dst) as tmp:
        for i, file_shapes in enumerate(plan):
            name = f"part-{i:05d}.safetensors"
            with open(tmp / name, "wb") as f:
                f.write(_safetensors_header(file_shapes, torch_dtype))
                for want in file_shapes:
                    plain, t = next(tensors)
                    assert hf_name(plain) == want, (plain, want)
                    t = narrow(plain, t, torch_dtype)
                    _write_raw(f, t)
                    total += t.numel() * t.element_size()
                    del t
                    bar.update()
            files.append((name, list(file_shapes)))
        bar.close()
        _name_files(tmp, files, total)
        eos = _copy_tokenizer(reader, tmp)
        cfg = hf_config(reader.model, dtype=dtype, eos_token_id=eos)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return {"tensors": len(shapes), "bytes": total, "files": len(files), "dst": str(dst)}


def _name_files(folder: Path, files: list[tuple[str, list[str]]], total: int) -> None:
    """HF's names: model.safetensors, or model-0000i-of-0000n.safetensors plus an index."""
    if len(files) == 1:
        os.rename(folder / files[0][0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, (name, tensors) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(folder / name, folder / final)
        weight_map.update({t: final for t in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_tokenizer(reader: Checkpoint, folder: Path) -> int | list[int] | None:
    """The run's tokenizer, if its data folder is still there, else the one from-hf kept in the
    checkpoint; returns the EOS id.

    A `tokenizer.json` is loaded by `PreTrainedTokenizerFast`; a SentencePiece `tokenizer.model`
    (prepare_data.py --tokenizer x.model) by `LlamaTokenizer`, which encodes with sentencepiece."""
    data = reader.meta.get("data_path")
    manifest = Path(data) / "manifest.json" if data else None
    if manifest is None or not manifest.is_file():
        return _copy_imported_tokenizer(reader, folder)
    info = json.loads(manifest.read_text())
    name = info.get("tokenizer", "tokenizer.json")
    shutil.copy(manifest.parent / name, folder / name)
    eos = info.get("eod_token", "<|endoftext|>")
    if not _copy_init_extras(reader.meta, manifest.parent / name, folder):
        _write_tokenizer_config(folder, name, eos)
    return info.get("eod_token_id")


def _copy_init_extras(meta: dict, tokenizer: Path, folder: Path) -> bool:
    """A run started with trainer.init_from from a Hugging Face model (or its from-hf import):
    that folder's tokenizer files besides the tokenizer (its configuration, special tokens, chat
    template, generation defaults), when its tokenizer is the data's, byte for byte (the launcher
    refuses other data). Returns whether a tokenizer_config.json was among them."""
    source = Path(meta["init_from"]) if meta.get("init_from") else None
    if source is None or not (source / tokenizer.name).is_file():
        return False
    if (source / tokenizer.name).read_bytes() != tokenizer.read_bytes():
        return False
    extras = [n for n in HF_TOKENIZER_FILES[2:] if (source / n).is_file()]
    for name in extras:
        shutil.copy(source / name, folder / name)
    return "tokenizer_config.json" in extras


def _copy_imported_tokenizer(reader: Checkpoint, folder: Path) -> int | list[int] | None:
    """The Hugging Face tokenizer files import_hf kept in the checkpoint (none: no tokenizer)."""
    kept = [name for name in HF_TOKENIZER_FILES if (reader.path / name).is_file()]
    tokenizers = [name for name in kept if name in ("tokenizer.json", "tokenizer.model")]
    if not tokenizers:
        return None
    for name in kept:
        shutil.copy(reader.path / name, folder / name)
    if "tokenizer_config.json" not in kept:
        _write_tokenizer_config(folder, tokenizers[0], eos=None)
    return reader.meta.get("eos_token_id")


def _write_tokenizer_config(folder: Path, name: str, eos: str | None) -> None:
    """tokenizer_config.json for tokenizer file `name` (the class that loads it, its EOS)."""
    if name.endswith(".model"):
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}
    else:
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        tok_cfg["eos_token"] = eos
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


# ---- import ------------------------------------------------------------------------------

SUPPORTED = ("LlamaForCausalLM",)


def model_config_from_hf(cfg: dict, *, name: str) -> ModelConfig:
    """Our ModelConfig for an HF Llama config.json; refuses what our model cannot represent."""
    arch = (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(
            f"unsupported architecture {arch}: from-hf reads {', '.join(SUPPORTED)} folders"
        )
    scaling = cfg.get("rope_scaling") or {}
    rope = cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"RoPE scaling {rope_type!r} is not supported (plain RoPE only)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{key}=true is not supported: megalite's Llama has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={cfg['hidden_act']} is not supported (SwiGLU only)")
    heads = cfg["num_attention_heads"]
    m = ModelConfig(
        name=name,
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
    )
    if cfg.get("head_dim", m.head_dim) != m.head_dim:
        raise CheckpointError(f"head_dim={cfg['head_dim']} != hidden_size / heads: not supported")
    return m


def _hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from model.safetensors or its sharded index, one tensor at a time."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} holds no model.safetensors (nor an index of shards)")
    for file in files:
        if not (folder / file).is_file():
            raise CheckpointError(f"{folder}: missing shard {file}")
        with safe_open(folder / file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def hf_plain_tensors(folder: Path, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, tensor as stored) of HF Llama folder `folder`, whose shape is `model`, one
    tensor at a time; a tied model's lm_head.weight is skipped. A tensor `model` lacks is refused,
    and so, once all are read, is a missing one."""
    plain_of = {hf_name(n): n for n, _ in _plain_names(model)}
    seen = set()
    for key, t in _hf_tensors(folder):
        if key not in plain_of:
            if key == "lm_head.weight" and model.tie_embeddings:
                continue
            raise CheckpointError(f"{folder}: unexpected tensor {key} for a {SUPPORTED[0]}")
        seen.add(plain_of[key])
        yield plain_of[key], t
    missing = sorted(set(plain_of.values()) - seen)
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:5])}")


class ImportSummary(TypedDict):
    tensors: int
    bytes: int
    dst: str
    model: ModelConfig


def import_hf(
    src: str | Path, dst: str | Path, *, layout: dict[str, int], progress: bool = True
) -> ImportSummary:
    """A layout-free checkpoint (weights; fresh optimizer state) from an HF Llama folder, plus
    `model.yaml`, the matching model config to train it with."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megalite.checkpoint.universal import tensor_file, write_meta

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json: not a Hugging Face model folder")
    model = model_config_from_hf(json.loads((src / "config.json").read_text()), name=src.name)
    seen, total = set(), 0
    with store.staging(dst) as tmp:
        (tmp / "tensors").mkdir()
        tensors = hf_plain_tensors(src, model)
        for plain, t in tqdm(tensors, desc="from-hf", unit="tensor", disable=not progress):
            save_file({"t": t.float().contiguous()}, tmp / tensor_file(plain, "param"))
            seen.add(plain)
            total += t.numel() * 4
        for name in HF_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        (tmp / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(model)))
        eos = json.loads((src / "config.json").read_text()).get("eos_token_id")
        write_meta(tmp, _import_meta(model, layout=layout, source=src, eos_token_id=eos))
    return {"tensors": len(seen), "bytes": total, "dst": str(dst), "model": model}


def _import_meta(
    model: ModelConfig, *, layout: dict[str, int], source: Path, eos_token_id: object
) -> dict:
    """A universal checkpoint's meta for imported weights: step 0, fresh optimizer and stream
    (and the EOS id of the HF config, which export_hf gives back)."""
    from dataclasses import asdict

    from megalite.checkpoint.universal import FORMAT

    return {
        "format": FORMAT,
        "step": 0,
        "consumed_tokens": 0,
        "model": asdict(model),
        "layout": layout,
        "source": str(source),
        "optimizer_state": False,
        "optimizer_step": 0,
        "lr_scheduler": None,
        "global_steps": 0,
        "global_samples": 0,
        "rank_state": {"step": 0, "consumed_tokens": 0, "initial_val_loss": None, "data": None},
        "tp_shards": {},
        "eos_token_id": eos_token_id,
    }


def _plain_names(model: ModelConfig) -> Iterator[tuple[str, object]]:
    return Llama(model, device="meta").named_parameters()
