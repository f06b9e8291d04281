"""Training on data that carries a loss mask (SFT: prompt tokens stored as `-(id + 1)`) is exact:
the loss of a step is the mean over the trained targets of the whole global batch, in every layout.

One masked dataset (int32 shards: random prompt/response spans, some windows with almost nothing
trained, fully masked stretches) is trained 3 steps by one process and by tp2×dp2 (ZeRO 2), pp2 and
tp2×pp2×dp2 (ZeRO 1); the one process's losses are a plain-torch loop's (cross-entropy summed
over the trained targets / their count, AdamW), every layout's the one process's. The untrained
validation loss is the masked mean of each layout's val micro-batches. A unit test checks that
non-trained positions get no gradient.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalite.config import Config
from megalite.data import loss_mask
from megalite.data.manifest import Manifest, SplitInfo, load_manifest, write_manifest
from megalite.data.stream import TokenStream
from megalite.data.writer import ShardWriter
from megalite.launch import launch
from megalite.model.llama import IGNORE_INDEX, Llama, cross_entropy
from megalite.parallel.engine import build_optimizer
from megalite.parallel.parallelize import weighted_loss
from megalite.parallel.schedule import build_scheduler
from tests.helpers import read_metrics, reference_step, short_job, train_losses

STEPS = 3
SAMPLE_TOKENS = 330  # 10 windows of seq_len + 1 = 33
LAYOUTS = {
    "single": [],
    "tp2-dp2-zero2": ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=2"],
    "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],
    "tp2-pp2-dp2-zero1": [
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.dp=2",
        "parallel.zero_stage=1",
    ],
}


def masked_documents(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    """`n` chat-like documents, stored as `loss_mask.encode` stores them: a prompt (not trained),
    then a response (trained) of 1 to 12 tokens, or none (most of them: padding), so that many
    windows have few trained tokens and some none."""
    docs = []
    for _ in range(n):
        prompt = int(rng.integers(4, 80))
        response = int(rng.integers(1, 13)) if rng.random() < 0.3 else 0
        ids = rng.integers(1, vocab, prompt + response)
        trained = np.arange(prompt + response) >= prompt
        docs.append(loss_mask.encode(ids, trained))
    return docs


def write_masked_data(root: Path, tokenizer_from: Path) -> Path:
    """A prepared folder of int32 masked shards (train and val), written with the shard writer
    (the EOD token it appends to each document is stored untrained)."""
    sample = load_manifest(tokenizer_from)
    root.mkdir(parents=True)
    shutil.copy(sample.tokenizer_path, root / sample.tokenizer)
    rng = np.random.default_rng(0)
    splits = {}
    for name, n_docs in (("train", 300), ("val", 40)):
        writer = ShardWriter(
            root / name,
            dtype=np.dtype(loss_mask.MASKED_DTYPE),
            eod_id=-sample.eod_token_id - 1,  # stored untrained: `loss_mask.encode`
            sample_tokens=SAMPLE_TOKENS,
            samples_per_shard=8,
        )
        for doc in masked_documents(rng, n_docs, sample.vocab_size):
            writer.add(doc)
        splits[name] = SplitInfo(writer.close())
    manifest = Manifest(
        root=root,
        vocab_size=sample.vocab_size,
        dtype=loss_mask.MASKED_DTYPE,
        eod_token=sample.eod_token,
        eod_token_id=sample.eod_token_id,
        tokenizer_sha256=sample.tokenizer_sha256,
        seed=0,
        sample_tokens=SAMPLE_TOKENS,
        shard_tokens=8 * SAMPLE_TOKENS,
        val_fraction=0.1,
        splits=splits,
        tokenizer=sample.tokenizer,
        loss_mask=True,
    )
    write_manifest(manifest)
    return root


def job(data: Path, run_dir: Path, layout: str) -> Config:
    """3 steps of global batch 8 (micro-batch 2: 4 micro-batches per step on one DP rank, 2 on
    two), an evaluation of 4 micro-batches per DP rank before the first step and after the last."""
    overrides = ["optim.warmup_steps=1", "optim.grad_clip=0.5", "trainer.eval_steps=4"]
    overrides += LAYOUTS[layout]
    return short_job(data, run_dir, *overrides, steps=STEPS)


def rank_streams(cfg: Config, data: Path, split: str) -> list[TokenStream]:
    t, dp = cfg.trainer, cfg.parallel.dp
    return [
        TokenStream(data, split, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                    dp_rank=r, dp_size=dp, seed=t.seed, shuffle=split == "train")
        for r in range(dp)
    ]  # fmt: skip


def masked_mean(model: Llama, batch: torch.Tensor) -> torch.Tensor:
    """By hand: the cross-entropy summed over the trained targets of `batch` (b, s + 1), divided
    by their count."""
    ids = torch.where(batch >= 0, batch, -batch - 1)  # (b, s + 1)
    trained = batch[:, 1:] >= 0  # (b, s)
    logits = model(ids[:, :-1])  # (b, s, vocab)
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (b, s)
    return (losses * trained).sum() / trained.sum()


def reference(cfg: Config, data: Path) -> tuple[list[float], list[int], list[torch.Tensor]]:
    """The plain-torch loop: per-step losses, trained targets per step, and the micro-batches."""
    t = cfg.trainer
    model = Llama(cfg.model, seed=t.seed)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, optim=cfg.optim, max_steps=t.max_steps)
    streams = [iter(s) for s in rank_streams(cfg, data, "train")]
    losses, counts, micro = [], [], []
    for _ in range(t.max_steps):
        parts = [next(s) for s in streams for _ in range(cfg.grad_accum_steps)]
        micro += parts
        batch = torch.cat(parts)  # (global batch, s + 1)
        loss = masked_mean(model, batch)
        losses.append(reference_step(loss, model, opt, sched, grad_clip=cfg.optim.grad_clip))
        counts.append(loss_mask.trained_tokens(batch))
    return losses, counts, micro


def initial_val_loss(cfg: Config, data: Path) -> float:
    """By hand: the untrained model on each DP rank's first `eval_steps` val micro-batches."""
    streams = [iter(s) for s in rank_streams(cfg, data, "val")]
    batch = torch.cat([next(s) for s in streams for _ in range(cfg.trainer.eval_steps)])
    with torch.no_grad():
        return masked_mean(Llama(cfg.model, seed=cfg.trainer.seed), batch).item()


@pytest.fixture(scope="module")
def runs(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every layout trained on the same masked data: layout -> run folder (and "data")."""
    tmp = tmp_path_factory.mktemp("masked")
    data = write_masked_data(tmp / "data", sample_data)
    out = {"data": data}
    for layout in LAYOUTS:
        launch(job(data, tmp / layout, layout), default_run_dir=tmp / "unused")
        out[layout] = tmp / layout
    return out


def losses_of(run_dir: Path) -> torch.Tensor:
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return torch.tensor([got[s] for s in range(1, STEPS + 1)], dtype=torch.float64)


def test_one_process_is_the_masked_mean_by_hand(runs: dict[str, Path]) -> None:
    data, run_dir = runs["data"], runs["single"]
    want, counts, micro = reference(job(data, run_dir, "single"), data)
    # The data is what the test means: micro-batches with nothing and with little to train.
    per_micro = [loss_mask.trained_tokens(b) for b in micro]
    assert 0 in per_micro and max(per_micro) >= 10 * min(c for c in per_micro if c)
    torch.testing.assert_close(losses_of(run_dir), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0)  # fmt: skip
    logged = {r["step"]: r["trained_tokens"] for r in read_metrics(run_dir) if "loss" in r}
    assert [logged[s] for s in range(1, STEPS + 1)] == counts


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "single"])
def test_layout_matches_one_process(layout: str, runs: dict[str, Path]) -> None:
    torch.testing.assert_close(losses_of(runs[layout]), losses_of(runs["single"]),
                               rtol=1e-5, atol=0)  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_validation_loss_is_the_masked_mean(layout: str, runs: dict[str, Path]) -> None:
    cfg = job(runs["data"], runs[layout], layout)
    first = next(r for r in read_metrics(runs[layout]) if "val_loss" in r)
    assert first["step"] == 0
    assert first["val_loss"] == pytest.approx(initial_val_loss(cfg, runs["data"]), rel=1e-5)


def test_untrained_positions_get_no_gradient() -> None:
    """The gradient of the logits is zero wherever the target is not trained, at any weight, and
    a micro-batch with nothing trained gives a zero loss and zero gradient (no nan)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)  # (b, s, vocab)
    ids = torch.randint(0, 11, (2, 7), generator=g)  # (b, s + 1)
    trained = torch.rand(2, 7, generator=g) < 0.5
    trained[0, 1] = True  # at least one trained target
    stored = torch.from_numpy(loss_mask.encode(ids.numpy(), trained.numpy())).long()
    _, targets = loss_mask.split_window(stored)  # (b, s)
    assert ((targets == IGNORE_INDEX) == ~trained[:, 1:]).all()
    loss = weighted_loss(cross_entropy, logits, targets, torch.tensor(0.7))
    loss.backward()
    assert logits.grad is not None
    untrained_rows = logits.grad[targets == IGNORE_INDEX]  # (n, vocab)
    assert untrained_rows.abs().max() == 0
    assert logits.grad[targets != IGNORE_INDEX].abs().sum(-1).min() > 0
    summed = F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
    torch.testing.assert_close(loss, 0.7 * summed / trained[:, 1:].sum())

    logits.grad = None
    nothing = torch.full_like(targets, IGNORE_INDEX)
    loss = weighted_loss(cross_entropy, logits, nothing, torch.tensor(0.0))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0
