"""Parameter counts and FLOPs from the shape (megalite/model/flops.py, the planner's and the
trainer's): the real model's count, the published counts, the Megatron-LM formula for GPT-3
175B, and a count of the matmuls; each rank's tensors (plan/shape.py) against the built model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalite.config import ModelConfig
from megalite.model.flops import count_params, flops_per_token, flops_per_token_6n, param_count
from megalite.model.llama import Llama, cross_entropy
from megalite.plan.layout import Layout
from megalite.plan.presets import load_preset, preset_names
from megalite.plan.shape import stage_param_count, stage_tensors
from megalite.plan.throughput import stage_flops_per_token
from tests.model.test_presets import NAMES, PUBLISHED


def test_presets_are_the_training_presets() -> None:
    assert preset_names() == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_counts_equal_the_real_models(name: str) -> None:
    cfg = load_preset(name)
    assert param_count(cfg) == count_params(cfg)
    assert param_count(cfg, exclude_embeddings=True) == count_params(cfg, exclude_embeddings=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name: str) -> None:
    assert param_count(load_preset(name)) == PUBLISHED[name]


def gpt3_175b() -> ModelConfig:
    """GPT-3 175B's shape (Brown et al. 2020, Table 2.1: 96 layers, d 12288, 96 heads) with
    Megatron's padded vocabulary 51200; a SwiGLU MLP of ffn 8h/3 has the 4h GeLU MLP's FLOPs."""
    h = 12288
    return ModelConfig(
        name="gpt3-175b",
        dim=h,
        n_layers=96,
        n_heads=96,
        n_kv_heads=96,
        ffn_dim=8 * h // 3,
        vocab_size=51200,
        max_seq_len=2048,
    )


def test_megatron_flops_formula_gpt3_175b() -> None:
    """Narayanan et al. 2021 (Megatron-LM, arXiv:2104.04473, eq. 3): with full recomputation an
    iteration of batch B costs 96 B s l h^2 (1 + s/6h + V/16lh) FLOPs; without it the layers'
    share is 3/4 of that, 72 B s l h^2 (1 + s/6h + V/12lh)."""
    cfg, s = gpt3_175b(), 2048
    layers, h, v = cfg.n_layers, cfg.dim, cfg.vocab_size
    assert flops_per_token(cfg, s) * s == pytest.approx(
        72 * s * layers * h**2 * (1 + s / (6 * h) + v / (12 * layers * h)), rel=1e-12
    )
    layout = Layout(seq_len=s, ac="full")
    _, executed = stage_flops_per_token(cfg, layout, 0)
    assert executed * s == pytest.approx(
        96 * s * layers * h**2 * (1 + s / (6 * h) + v / (16 * layers * h)), rel=1e-12
    )


def test_gpt3_training_compute() -> None:
    """Brown et al. 2020, Table D.1: GPT-3 175B trained on 300B tokens took 3.14e23 FLOPs (6ND)."""
    cfg = gpt3_175b()
    n = param_count(cfg)
    assert n == pytest.approx(175e9, rel=0.01)
    assert 6 * n * 300e9 == pytest.approx(3.14e23, rel=0.01)
    # attention at s = 2048 adds s / 6h = 2.8 %, the head's share is already in 6N
    assert flops_per_token(cfg, 2048) / flops_per_token_6n(cfg) == pytest.approx(1.0278, abs=1e-3)


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: None = None
) -> torch.Tensor:
    """Causal attention as two plain matmuls (no fused kernel): every FLOP is a counted matmul."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (b, heads, s, s)
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v  # (b, heads, s, hd)


def test_flops_per_token_counts_the_matmuls() -> None:
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    model = Llama(cfg)
    for layer in model.layers:
        layer.attn.core = _matmul_attention
    b, s = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1))
    with FlopCounterMode(display=False) as counter:
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert counter.get_total_flops() == flops_per_token(cfg, s) * b * s


def test_stage_tensors_are_the_model_parameters() -> None:
    cfg = load_preset("tiny")
    with torch.device("meta"):
        model = Llama(cfg)
    real = {name: p.numel() for name, p in model.named_parameters()}
    planned = {t.name: t.numel for t in stage_tensors(cfg, tp=1, pp=1, stage=0)}
    assert planned == real


@pytest.mark.parametrize("name", ["tiny", "1b", "70b"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_stages_partition_the_model(name: str, tp: int, pp: int) -> None:
    """Over TP ranks and stages the shards add up to the model, plus the vocabulary padding,
    the norms and replicated kv heads each TP rank holds, and a tied embedding's second copy."""
    cfg = load_preset(name)
    held = sum(sum(t.numel for t in stage_tensors(cfg, tp=tp, pp=pp, stage=s)) for s in range(pp))
    assert held == sum(stage_param_count(cfg, tp=tp, pp=pp, stage=s) for s in range(pp))
    d, v = cfg.dim, cfg.vocab_size
    vocab_tables = 1 if cfg.tie_embeddings else 2
    padding = vocab_tables * (-v % tp) * d
    norms = (2 * cfg.n_layers + 1) * d * (tp - 1)
    kv_copies = 2 * cfg.n_layers * d * cfg.head_dim * max(0, tp - cfg.n_kv_heads)
    tied_copy = (v + -v % tp) * d if cfg.tie_embeddings and pp > 1 else 0
    assert held * tp == param_count(cfg) + padding + norms + kv_copies + tied_copy
