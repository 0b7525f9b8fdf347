"""What the model computes, against hand-written math, where a plausible bug leaves shapes and
losses looking normal: QK-norm's place before RoPE, the init of every residual projection, tied
embeddings sharing one matrix, and eval mode turning off every stochastic option (attention dropout too)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import config_of
from model.gpt import GPT, ModelConfig

SMALL = "MODEL_SIZE_CUSTOM=y N_LAYER=2 N_HEAD=2 N_EMBD=32 BLOCK_SIZE=16"


def by_hand_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Per-head RMSNorm or LayerNorm over the last dim, with the module's gains (and bias)."""
    if isinstance(norm, nn.RMSNorm):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    centred = x - x.mean(-1, keepdim=True)
    out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    return out + norm.bias if norm.bias is not None else out


def by_hand_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Channel i and i + D/2 rotated by position * theta^(-2i/D), written out per position."""
    T, D = x.size(2), x.size(3)
    half = D // 2
    out = torch.empty_like(x)
    for t in range(T):
        angle = t * theta ** (-2 * torch.arange(half, dtype=torch.float64) / D)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[:, :, t, :half], x[:, :, t, half:]
        out[:, :, t, :half] = x1 * cos - x2 * sin
        out[:, :, t, half:] = x2 * cos + x1 * sin
    return out


def by_hand_attention(attn, x: torch.Tensor, theta: float) -> torch.Tensor:
    """c_attn -> QK-norm -> RoPE -> causal softmax(q k^T / sqrt(d)) v -> c_proj, one head at a time."""
    B, T, C = x.shape
    H = attn.config.n_head
    D = C // H
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    q, k = by_hand_norm(q, attn.q_norm), by_hand_norm(k, attn.k_norm)
    q, k = by_hand_rope(q, theta), by_hand_rope(k, theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("norm", ["NORM_RMSNORM=y", "NORM_LAYERNORM=y"])
@pytest.mark.parametrize("kernel", ["ATTN_SDPA=y", "ATTN_REFERENCE=y"])
def test_qk_norm_comes_before_rope_with_random_gains(norm, kernel):
    # Unit gains commute with the rotation (it keeps each pair's norm), so the gains are drawn
    # far from 1 and differ per channel: norm after RoPE then gives another function.
    cfg = config_of(SMALL, norm, kernel, "POS_ROPE=y QK_NORM=y ROPE_THETA=\"500\"")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_config(cfg, 64))
    attn = model.blocks[0].attn
    with torch.no_grad():
        for module in (attn.q_norm, attn.k_norm):
            module.weight.copy_(torch.empty_like(module.weight).uniform_(0.2, 3.0))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.5 * torch.randn_like(module.bias))
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        got = attn(x, (model.rope_cos, model.rope_sin), None if kernel == "ATTN_SDPA=y" else
                   torch.ones(12, 12, dtype=torch.bool).tril())
        want = by_hand_attention(attn, x, 500.0)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def residual_projections(model: GPT) -> set[str]:
    """The names of the linear layers that write into the residual stream: attention's and the
    MLP's output projection in every block (MTP blocks included)."""
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    blocks += [f"mtp_blocks.{i}" for i in range(len(model.mtp_blocks))]
    return {f"{b}.{part}.c_proj" for b in blocks for part in ("attn", "mlp")}


@pytest.mark.parametrize("extra", ["", "MLP_SWIGLU=y BIAS=n MTP_HEADS=1"])
def test_every_residual_projection_starts_at_init_std_over_sqrt_2_layers(extra):
    # 3 blocks of width 128: each c_proj has >= 16384 weights, so its sample std lies within
    # 5 standard errors (std * 5 / sqrt(2n) <= 2.8%) of the drawn std; scaled and unscaled differ 2.45x.
    cfg = config_of("MODEL_SIZE_CUSTOM=y N_LAYER=3 N_HEAD=4 N_EMBD=128 BLOCK_SIZE=16 INIT_STD=\"0.05\"", extra)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_config(cfg, 64))
    residual = residual_projections(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert residual <= set(linears)
    for name, module in linears.items():
        w = module.weight
        expected = 0.05 / math.sqrt(2 * 3) if name in residual else 0.05
        tolerance = 5 / math.sqrt(2 * w.numel())
        assert w.std().item() == pytest.approx(expected, rel=tolerance), name
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(w.numel()), name
        if module.bias is not None:
            assert not module.bias.any(), name
    assert model.wte.weight.std().item() == pytest.approx(0.05, rel=5 / math.sqrt(2 * model.wte.weight.numel()))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_share_one_matrix_and_untied_add_vocab_times_width(tied):
    cfg = config_of(SMALL, TIE_EMBEDDINGS=tied)
    model = GPT(ModelConfig.from_config(cfg, 64))
    untied = GPT(ModelConfig.from_config(config_of(SMALL, TIE_EMBEDDINGS=False), 64))
    assert (model.lm_head.weight is model.wte.weight) == tied
    assert untied.num_params() - model.num_params() == (0 if not tied else 64 * 32)


def test_every_stochastic_option_is_off_in_eval_mode_and_on_in_training():
    # Dropout everywhere and MoE router jitter: two eval forwards agree to the bit, two training ones do not.
    cfg = config_of(SMALL, 'DROPOUT="0.3" MOE=y MOE_EXPERTS=4 MOE_JITTER="0.5" MTP_HEADS=1')
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_config(cfg, 64))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        a, b = model(idx, idx)[1], model(idx, idx)[1]
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, d = model(idx, idx)[1], model(idx, idx)[1]
    assert not torch.equal(c, d)
    for module in model.modules():  # jitter alone, with dropout off, also differs in training
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        e, f = model(idx, idx)[1], model(idx, idx)[1]
    assert not torch.equal(e, f)
