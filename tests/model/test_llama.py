"""The plain Llama: shapes, causality, GQA, tying, deterministic init, RoPE, learning, loss."""

import dataclasses

import pytest
import torch

from megalite.config import ModelConfig
from megalite.model import IGNORE_INDEX, Llama, cross_entropy
from megalite.model.llama import apply_rotary


def small(**overrides: object) -> ModelConfig:
    base = ModelConfig(
        name="test",
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        vocab_size=101,
        max_seq_len=32,
    )
    return dataclasses.replace(base, **overrides)


def build(cfg: ModelConfig, seed: int = 0) -> Llama:
    return Llama(cfg, seed=seed)


def tokens(cfg: ModelConfig, b: int = 2, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_dtype() -> None:
    cfg = small()
    logits = build(cfg)(tokens(cfg, b=3, s=10))
    assert logits.shape == (3, 10, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_bf16_params_give_bf16_logits() -> None:
    cfg = small()
    model = build(cfg).to(torch.bfloat16)
    assert model(tokens(cfg)).dtype == torch.bfloat16


def test_causal() -> None:
    cfg = small()
    model = build(cfg)
    x = tokens(cfg)
    t = 7
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gqa_equals_mha_with_repeated_kv() -> None:
    gqa_cfg = small(n_heads=4, n_kv_heads=2)
    gqa = build(gqa_cfg)
    mha = build(small(n_heads=4, n_kv_heads=4))
    groups, hd = 2, gqa_cfg.head_dim
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            # kv head j serves query heads j*groups .. j*groups + groups - 1
            state[key] = w.view(-1, hd, gqa_cfg.dim).repeat_interleave(groups, 0).flatten(0, 1)
    mha.load_state_dict(state)
    x = tokens(gqa_cfg)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x))


def test_tied_embeddings_share_storage() -> None:
    tied = build(small(tie_embeddings=True))
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = build(small(tie_embeddings=False))
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 101 * 64


def test_same_seed_same_weights() -> None:
    cfg = small()
    a, b, c = build(cfg, seed=3), build(cfg, seed=3), build(cfg, seed=4)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc) or name.endswith("norm.weight"), name


@pytest.mark.parametrize("tie", [False, True])
def test_meta_then_to_empty_equals_direct_init(tie: bool) -> None:
    cfg = small(tie_embeddings=tie)
    direct = build(cfg, seed=5)
    with torch.device("meta"):
        lazy = Llama(cfg, seed=5)
    assert lazy.embed.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights(5)
    assert (lazy.head.weight is lazy.embed.weight) == tie
    assert direct.state_dict().keys() == lazy.state_dict().keys()
    for name, p in direct.state_dict().items():
        assert torch.equal(p, lazy.state_dict()[name]), name
    torch.testing.assert_close(lazy.rope.cos, direct.rope.cos, rtol=0, atol=0)
    torch.testing.assert_close(lazy.rope.sin, direct.rope.sin, rtol=0, atol=0)


def test_init_statistics() -> None:
    cfg = small(dim=256, ffn_dim=512, n_layers=8)
    model = build(cfg)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    assert model.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.layers[0].attn.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.layers[0].mlp.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))
    assert all(not key.endswith(("rope.cos", "rope.sin")) for key in model.state_dict())


def rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE as a complex rotation: (x[j], x[j + d/2]) turned by pos * theta^(-2j/d)."""
    s, d = x.shape[-2], x.shape[-1]
    x64 = x.double()
    z = torch.complex(x64[..., : d // 2], x64[..., d // 2 :])  # (..., s, d/2)
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = torch.arange(s, dtype=torch.float64)[:, None] * freq  # (s, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).float()


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_reference(theta: float) -> None:
    cfg = small(rope_theta=theta, max_seq_len=64)
    rope = build(cfg).rope
    x = torch.randn(2, 3, 64, cfg.head_dim)  # (b, h, s, hd)
    cos, sin = rope(64)
    torch.testing.assert_close(
        apply_rotary(x, cos, sin), rope_reference(x, theta), atol=1e-4, rtol=1e-4
    )


def test_rope_rejects_too_long_sequences() -> None:
    cfg = small(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        build(cfg)(tokens(cfg, s=9))


def test_sgd_on_a_repeated_batch_lowers_the_loss() -> None:
    cfg = small()
    model = build(cfg)
    x = tokens(cfg, b=4, s=16)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        loss = cross_entropy(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(101.0)).item(), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def test_cross_entropy_ignores_minus_100() -> None:
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    targets = torch.randint(11, (2, 5))
    masked = targets.clone()
    masked[0, :2] = IGNORE_INDEX
    masked[1, 4] = IGNORE_INDEX
    keep = masked != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits.float()[keep], targets[keep])
    loss = cross_entropy(logits, masked)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
