"""FLOPs per token against hand arithmetic, and the 6N approximation against the exact count."""

import pytest

from megalite.config import ModelConfig
from megalite.model import count_params, flops_per_token, flops_per_token_6n
from megalite.plan.presets import load_preset


def test_flops_per_token_by_hand() -> None:
    cfg = ModelConfig(
        name="hand", dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=32
    )
    # head_dim 4, kv width 4, seq 10. Per layer forward:
    #   q 2*8*8=128, k 2*8*4=64, v 64, o 128, MLP 3*2*8*16=768, attention 2*2*10*8=320 -> 1472
    # 2 layers = 2944, head 2*8*32 = 512, forward 3456, training x3 = 10368.
    assert flops_per_token(cfg, 10) == 10368.0


def test_count_params_by_hand() -> None:
    cfg = ModelConfig(
        name="hand", dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=32
    )
    # per layer: wq 64 + wk 32 + wv 32 + wo 64 + 3*128 + 2 norms 16 = 592; x2 = 1184
    # + final norm 8 + embed 256 + head 256 = 1704
    assert count_params(cfg) == 1704
    assert count_params(cfg, exclude_embeddings=True) == 1704 - 2 * 256
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert count_params(tied) == 1704 - 256
    assert count_params(tied, exclude_embeddings=True) == 1704 - 2 * 256


def test_6n_close_to_exact_for_7b() -> None:
    cfg = load_preset("7b")  # Llama-2-7B
    exact, approx = flops_per_token(cfg, 4096), flops_per_token_6n(cfg)
    assert 1.0 <= exact / approx <= 1.3
    # exact = 6 * (N - norm gains) + 12 * L * s * d, the PaLM formula
    n = count_params(cfg, exclude_embeddings=True) + cfg.vocab_size * cfg.dim
    norm_gains = (2 * cfg.n_layers + 1) * cfg.dim
    assert exact == 6 * (n - norm_gains) + 12 * cfg.n_layers * 4096 * cfg.dim
    assert approx == 6 * n


def test_count_params_consistent_for_7b() -> None:
    cfg = load_preset("7b")  # Llama-2-7B
    total = count_params(cfg)
    assert total == 6_738_415_616
    assert total - count_params(cfg, exclude_embeddings=True) == 2 * cfg.vocab_size * cfg.dim
    assert flops_per_token_6n(cfg) == pytest.approx(6 * (total - cfg.vocab_size * cfg.dim))
