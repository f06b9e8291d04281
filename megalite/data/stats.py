"""`prepare_data.py stats DIR`: what a prepared folder holds, read back from its shards.

Per split and per shard: tokens, documents (EOD tokens) and samples; the document-length
distribution over the split's token stream (tokens between EOD tokens, which may span samples and
shards) as log2-binned text histogram and, with `--plot`, a PNG; and the most frequent tokens,
decoded with the folder's own tokenizer. Shards are read with `read_shard`, so a damaged one
fails with its name. Fine-tuning data (packed windows with a loss mask) reports its records (from
the manifest) and trained tokens instead of document lengths: its EOD tokens are padding too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megalite.data.codec import read_shard
from megalite.data.encode import SENTENCEPIECE_NAME, Encoder, TokenizerFile
from megalite.data.loss_mask import decode
from megalite.data.manifest import Manifest, SplitTotals, load_manifest

_BAR = 40  # characters of the longest histogram bar


@dataclass
class ShardStats:
    path: str
    samples: int
    documents: int
    tokens: int


@dataclass
class SplitStats(SplitTotals):
    """One split, counted from its shards; `token_counts[i]` is how often token i occurs."""

    name: str
    shards: list[ShardStats] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    trained: int | None = None  # trained tokens, for data with a loss mask


def compute_stats(manifest: Manifest, *, progress: bool = False) -> dict[str, SplitStats]:
    """Read every shard of every split (with a progress bar over shards on stderr)."""
    total = sum(len(info.shards) for info in manifest.splits.values())
    out: dict[str, SplitStats] = {}
    with tqdm(total=total, unit="shard", file=sys.stderr, disable=not progress) as bar:
        for name, info in manifest.splits.items():
            split = out[name] = SplitStats(name, trained=0 if manifest.loss_mask else None)
            counts = np.zeros(manifest.vocab_size, dtype=np.int64)
            lengths: list[np.ndarray] = []
            run = 0  # tokens since the last EOD, carried across samples and shards
            for path, shard in zip(manifest.shards(name), info.shards, strict=True):
                samples = read_shard(path, shard, dtype=manifest.dtype)
                flat = np.concatenate(samples) if samples else np.zeros(0, manifest.dtype)
                if split.trained is not None:
                    flat, trained = decode(flat)
                    split.trained += int(trained.sum())
                counts += np.bincount(flat, minlength=manifest.vocab_size)[: manifest.vocab_size]
                eods = np.flatnonzero(flat == manifest.eod_token_id)
                if split.trained is not None:
                    documents = shard.documents  # records; an EOD may be padding
                elif len(eods):
                    lengths.append(np.diff(eods, prepend=-1 - run) - 1)
                    run = len(flat) - int(eods[-1]) - 1
                    documents = len(eods)
                else:
                    run += len(flat)
                    documents = 0
                split.shards.append(ShardStats(shard.path, len(samples), documents, len(flat)))
                bar.update()
            split.lengths = np.concatenate(lengths) if lengths else split.lengths
            split.token_counts = counts
    return out


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over the bins [0, 1), [1, 2), [2, 4), [4, 8), ..., from the shortest
    length's bin to the longest's."""
    if not len(lengths):
        return []
    bins = np.where(lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))).astype(int) + 1, 0)
    counts = np.bincount(bins)
    edges = [0] + [2**i for i in range(len(counts))]
    first = int(bins.min())
    return [(edges[i], edges[i + 1], int(counts[i])) for i in range(first, len(counts))]


def tokenizer_of(manifest: Manifest) -> Encoder:
    """The folder's own tokenizer, for decoding."""
    kind = "sentencepiece" if manifest.tokenizer == SENTENCEPIECE_NAME else "hf"
    data = manifest.tokenizer_path.read_bytes()
    return Encoder(TokenizerFile(kind, data, manifest.eod_token), threads=1)


def format_stats(manifest: Manifest, stats: dict[str, SplitStats], *, top: int = 20) -> str:
    """The console report."""
    enc = tokenizer_of(manifest)
    lines = [
        f"{manifest.root}: vocab {manifest.vocab_size:,} ({manifest.dtype}), "
        f"{manifest.eod_token} = {manifest.eod_token_id}, tokenizer {manifest.tokenizer}"
    ]
    for split in stats.values():
        lines += [
            "",
            f"{split.name}: {split.tokens:,} tokens, {split.documents:,} documents, "
            f"{split.samples:,} samples in {len(split.shards)} shard(s)",
            f"  {'shard':<32} {'tokens':>14} {'documents':>11} {'samples':>9}",
        ]
        lines += [
            f"  {s.path:<32} {s.tokens:>14,} {s.documents:>11,} {s.samples:>9,}"
            for s in split.shards
        ]
        lines += _length_lines(split.lengths) if split.trained is None else _trained_line(split)
        lines += _top_lines(split.token_counts, enc, top)
    return "\n".join(lines)


def _length_lines(lengths: np.ndarray) -> list[str]:
    if not len(lengths):
        return ["  no documents"]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    lines = [
        f"  document length (tokens, EOD excluded): mean {lengths.mean():,.1f}, median {p50:,.0f},"
        f" p90 {p90:,.0f}, p99 {p99:,.0f}, max {lengths.max():,}"
    ]
    hist = length_histogram(lengths)
    peak = max(c for _, _, c in hist)
    for low, high, count in hist:
        bar = "█" * round(_BAR * count / peak)
        lines.append(f"    [{low:>7,}, {high:>7,})  {count:>10,}  {bar}")
    return lines


def _trained_line(split: SplitStats) -> list[str]:
    share = 100 * (split.trained or 0) / max(split.tokens, 1)
    return [f"  trained tokens: {split.trained:,} of {split.tokens:,} ({share:.1f}%)"]


def _top_lines(counts: np.ndarray, enc: Encoder, top: int) -> list[str]:
    if top <= 0:
        return []
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[:top]
    lines = [f"  top {len(order)} tokens:", f"    {'id':>8} {'count':>14} {'share':>7}  token"]
    for i in order:
        if counts[i] == 0:
            break
        share = 100 * counts[i] / total
        lines.append(f"    {i:>8} {counts[i]:>14,} {share:>6.2f}%  {enc.token_text(int(i))!r}")
    return lines


def plot_stats(stats: dict[str, SplitStats], path: Path) -> Path:
    """Document-length histograms (log2 bins), one panel per split, as a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2 * len(stats)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stats), 1, squeeze=False)[:, 0]
    for ax, split in zip(axes, stats.values(), strict=True):
        hist = length_histogram(split.lengths)
        lows = [max(low, 0.5) for low, _, _ in hist]
        widths = [high - max(low, 0.5) for low, high, _ in hist]
        ax.bar(lows, [c for _, _, c in hist], width=widths, align="edge", edgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel("documents")
        ax.set_title(f"{split.name}: {split.documents:,} documents, {split.tokens:,} tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def report(root: str | Path, *, top: int = 20, plot: Path | None = None) -> str:
    """Load the folder, count, optionally plot; the text report."""
    manifest = load_manifest(root)
    stats = compute_stats(manifest, progress=True)
    text = format_stats(manifest, stats, top=top)
    if plot is not None:
        text += f"\n\nplot: {plot_stats(stats, plot)}"
    return text
