"""`python tools/convert.py` / `megalite-convert`: look into checkpoints and convert them.

inspect CKPT                     layout, step, tokens, tensors, shapes and sizes
verify CKPT                      every file's size and CRC-32 against meta.json
to-hf --src CKPT --dst DIR       a Hugging Face LlamaForCausalLM folder
reshard --src CKPT --dst DIR     a layout-free checkpoint, for a run of another TP/PP/DP layout
from-hf --src HF_DIR --dst DIR   a layout-free checkpoint of a Hugging Face Llama's weights

Every command reads both kinds of checkpoint megalite writes: native (DeepSpeed's files, any
tp/pp/dp, ZeRO 0-3, fp32 or bf16) and layout-free (reshard's and from-hf's); see reader.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megalite.checkpoint import store
from megalite.checkpoint.store import CheckpointError

if TYPE_CHECKING:
    from megalite.checkpoint.reader import Checkpoint


def _inspect(args: argparse.Namespace) -> None:
    from megalite.checkpoint.reader import open_checkpoint

    reader = open_checkpoint(args.ckpt)
    meta, m = reader.meta, reader.model
    total_files = sum(store.file_size(entry) for entry in meta["files"].values())
    print(f"checkpoint   {reader.path}")
    print(f"step         {meta['step']}   tokens {meta['consumed_tokens']:,}")
    print(f"layout       {_layout_words(reader)}")
    print(
        f"model        {m.name}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads "
        f"({m.n_kv_heads} kv), ffn {m.ffn_dim}, vocab {m.vocab_size}, "
        f"{'tied' if m.tie_embeddings else 'untied'}"
    )
    print(f"files        {len(meta['files'])}, {total_files / 2**20:,.1f} MiB")
    print(f"\n{'tensor':<40}{'shape':>20}{'MiB (fp32)':>12}")
    params = 0
    for name, t in reader.tensors("param"):
        params += t.numel()
        print(f"{name:<40}{str(tuple(t.shape)):>20}{t.numel() * 4 / 2**20:>12.2f}")
    print(f"{'total':<40}{params:>20,}{params * 4 / 2**20:>12.2f}")


def _layout_words(reader: Checkpoint) -> str:
    """inspect's layout line: a native checkpoint's layout, or where a layout-free one is from."""
    meta = reader.meta
    if not reader.layout_free:
        from megalite.checkpoint.reader import CheckpointReader

        assert isinstance(reader, CheckpointReader)  # the native kind
        return (
            f"tp={reader.tp} pp={reader.pp} dp={reader.dp}  ZeRO {meta.get('zero_stage')}  "
            f"sequence_parallel={meta.get('sequence_parallel', False)}"
        )
    if meta.get("source_layout"):
        src = meta["source_layout"]
        origin = f"resharded from tp={src['tp']} pp={src['pp']} dp={src['dp']}"
    else:
        origin = f"imported from {meta['source']}" if meta.get("source") else "imported"
    weights = "" if len(reader.kinds) > 1 else ", weights only (fresh optimizer)"
    return f"layout-free (resume in any layout), {origin}{weights}"


def _verify(args: argparse.Namespace) -> None:
    from megalite.checkpoint.reader import describe, verify_checkpoint

    meta = verify_checkpoint(Path(args.ckpt))
    files = meta["files"]
    total = sum(store.file_size(entry) for entry in files.values())
    sizes_only = sum(isinstance(entry, int) for entry in files.values())  # saved before CRC-32
    how = f"{sizes_only} of them by size only: an older checkpoint" if sizes_only else "CRC-32"
    print(
        f"ok: {args.ckpt}: {len(files)} files, {total / 2**20:,.1f} MiB checked ({how}), "
        f"{describe(Path(args.ckpt), meta)}"
    )


def _to_hf(args: argparse.Namespace) -> None:
    from megalite.checkpoint.hf import export_hf

    summary = export_hf(args.src, args.dst, dtype=args.dtype, progress=not args.quiet)
    print(
        f"{'tensors':<10}{summary['tensors']}\n{'bytes':<10}{summary['bytes']:,}\n"
        f"{'files':<10}{summary['files']}\n{'written':<10}{summary['dst']}"
    )


def _reshard(args: argparse.Namespace) -> None:
    from megalite.checkpoint.reader import open_checkpoint
    from megalite.checkpoint.universal import write_universal

    source = open_checkpoint(args.src)
    layout = {"tp": args.tp, "pp": args.pp, "dp": args.dp or source.dp}
    _check_layout(source.model, layout)
    summary = write_universal(args.src, args.dst, layout=layout, progress=not args.quiet)
    kinds = ", ".join("weights" if k == "param" else k for k in summary["kinds"])
    was = "layout-free" if source.layout_free else source.meta["layout"]
    print(
        f"{'tensors':<10}{summary['tensors']} x ({kinds})\n"
        f"{'bytes':<10}{summary['bytes']:,}\n{'layout':<10}{was} -> {layout}\n"
        f"{'written':<10}{summary['dst']}  (resume with trainer.resume={summary['dst']} "
        f"parallel.tp={layout['tp']} parallel.pp={layout['pp']} parallel.dp={layout['dp']})"
    )


def _check_layout(model, layout: dict[str, int]) -> None:
    from megalite.config import ConfigError, ParallelConfig, validate_parallel

    try:
        validate_parallel(
            ParallelConfig(tp=layout["tp"], pp=layout["pp"], dp=layout["dp"], zero_stage=0), model
        )
    except ConfigError as e:
        raise CheckpointError(
            f"the model cannot take tp={layout['tp']} pp={layout['pp']}: {e}"
        ) from e


def _from_hf(args: argparse.Namespace) -> None:
    import json

    from megalite.checkpoint.hf import import_hf, model_config_from_hf

    config = Path(args.src) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{args.src} has no config.json: not a Hugging Face model folder")
    layout = {"tp": args.tp, "pp": args.pp, "dp": args.dp}
    _check_layout(model_config_from_hf(json.loads(config.read_text()), name="hf"), layout)
    summary = import_hf(args.src, args.dst, layout=layout, progress=not args.quiet)
    m = summary["model"]
    print(
        f"{'tensors':<10}{summary['tensors']}\n{'bytes':<10}{summary['bytes']:,}\n"
        f"{'written':<10}{summary['dst']}\n{'model':<10}{summary['dst']}/model.yaml "
        f"(copy it to conf/model/{m.name}.yaml)\nresume with: model={m.name} "
        f"trainer.resume={summary['dst']} parallel.tp={args.tp} parallel.pp={args.pp} "
        f"parallel.dp={args.dp}\nor start a new run (step 0, any layout) from its weights with: "
        f"trainer.init_from={summary['dst']}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite-convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print a checkpoint's layout and tensors")
    ins.add_argument("ckpt")
    ins.set_defaults(run=_inspect)
    ver = sub.add_parser("verify", help="check every file of a checkpoint against its checksum")
    ver.add_argument("ckpt")
    ver.set_defaults(run=_verify)
    hf = sub.add_parser("to-hf", help="export a Hugging Face LlamaForCausalLM folder")
    hf.add_argument("--src", required=True, help="a checkpoint folder (native or layout-free)")
    hf.add_argument("--dst", required=True, help="a new folder")
    hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    hf.add_argument("--quiet", action="store_true", help="no progress bar")
    hf.set_defaults(run=_to_hf)
    rs = sub.add_parser("reshard", help="rewrite a checkpoint for another TP/PP/DP layout")
    rs.add_argument("--src", required=True, help="a checkpoint folder (native or layout-free)")
    rs.add_argument("--dst", required=True, help="a new folder")
    rs.add_argument("--tp", type=int, required=True)
    rs.add_argument("--pp", type=int, required=True)
    rs.add_argument("--dp", type=int, default=None, help="default: the source's (1 for from-hf's)")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.set_defaults(run=_reshard)
    fh = sub.add_parser("from-hf", help="a checkpoint from a Hugging Face Llama folder")
    fh.add_argument("--src", required=True, help="a folder with config.json + safetensors")
    fh.add_argument("--dst", required=True, help="a new folder")
    fh.add_argument("--tp", type=int, default=1)
    fh.add_argument("--pp", type=int, default=1)
    fh.add_argument("--dp", type=int, default=1)
    fh.add_argument("--quiet", action="store_true", help="no progress bar")
    fh.set_defaults(run=_from_hf)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from megalite.rank.env import name_deepspeed_accelerator

    args = parser().parse_args(argv)
    name_deepspeed_accelerator()  # before a ZeRO checkpoint's unpickling imports DeepSpeed
    try:
        args.run(args)
    except CheckpointError as e:
        print(f"megalite-convert: error: {e}", file=sys.stderr)
        return 2
    return 0
