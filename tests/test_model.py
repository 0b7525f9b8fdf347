"""The GPT module: nanoGPT parity, every option's shapes and gradients, causality."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.gpt import GPT, ModelConfig, apply_rope, rope_tables
from model.mlp import ACTIVATIONS


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


def test_gpt2_small_parameter_count_matches_nanogpt():
    # nanoGPT's GPT-2 124M (vocab 50257, block 1024, bias, tied): 124,439,808 parameters,
    # reported as 123.65M non-embedding (position embeddings excluded).
    config = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=4, n_embd=256, n_head=4, n_kv_head=4))
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.blocks[0].attn.c_attn.bias.abs().max().item() == 0


# Attention: (backend, window, attention soft-cap, final-logit soft-cap). Each runs with every
# norm/position/MLP/QK-norm combination; flash is covered by tests/test_attention.py (needs CUDA).
ATTENTION = [("sdpa", 0, 0.0, 0.0), ("sdpa", 5, 0.0, 30.0), ("reference", 0, 0.0, 0.0), ("reference", 5, 20.0, 30.0)]
OPTIONS = list(itertools.product(["layernorm", "rmsnorm"], ["learned", "rope"], sorted(ACTIVATIONS),
                                 [False, True], ATTENTION))


@pytest.mark.parametrize("norm, pos, mlp, qk_norm, attention", OPTIONS)
def test_every_option_combination_trains(norm, pos, mlp, qk_norm, attention):
    attn, window, attn_softcap, final_softcap = attention
    torch.manual_seed(0)
    config = tiny(norm=norm, pos=pos, mlp=mlp, qk_norm=qk_norm, bias=(norm == "layernorm"),
               tie_embeddings=(mlp != "relu2"), n_kv_head=2 if qk_norm else 4, dropout=0.1,
               attn=attn, attn_window=window, attn_softcap=attn_softcap, final_logit_softcap=final_softcap)
    model = GPT(config)
    x = torch.randint(0, 64, (3, 16))
    logits, loss = model(x, torch.roll(x, -1, 1))
    assert logits.shape == (3, 16, 64)
    assert loss.item() == pytest.approx(math.log(64), abs=0.15), "init loss should be ~ln(vocab)"
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (model.wpe is None) == (pos == "rope")
    assert (model.lm_head.weight is model.wte.weight) == config.tie_embeddings


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_attention_is_causal(pos):
    torch.manual_seed(0)
    model = GPT(tiny(pos=pos, n_kv_head=1)).eval()
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 64
    with torch.no_grad():
        a, _ = model(x, x)
        b, _ = model(y, y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-4)


def test_rope_rotation_preserves_norm_and_encodes_relative_position():
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs, ks = q.expand(1, 1, 32, 8), k.expand(1, 1, 32, 8)
    rq, rk = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), qs.norm(dim=-1), atol=1e-5)
    # <q at m, k at n> depends only on m - n
    assert torch.allclose((rq[0, 0, 5] * rk[0, 0, 2]).sum(), (rq[0, 0, 20] * rk[0, 0, 17]).sum(), atol=1e-4)


def rope_by_halves(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """The formulation RoPE had before its tables went full width (the oracle): half-width cos/sin
    tables, x (B, H, T, D) split into halves, four products, a difference, a sum and a concatenation."""
    D, T = x.size(-1), x.size(2)
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_full_width_tables_equals_the_rotation_by_halves_bit_for_bit(dtype):
    """Same products and sums as the oracle, so values and gradients are equal to the last bit."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 12, 16, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(16, 20, 10000.0)
    new = apply_rope(x, cos, sin)
    x_old = x.detach().clone().requires_grad_()
    old = rope_by_halves(x_old)
    assert torch.equal(new, old)
    grad = torch.randn_like(new)
    new.backward(grad)
    old.backward(grad)
    assert torch.equal(x.grad, x_old.grad)


def test_per_token_rope_tables_are_the_rows_of_the_positions():
    cos, sin = rope_tables(8, 16, 10000.0)
    position = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    x = torch.randn(1, 3, 8, 8)
    by_token = apply_rope(x, cos[position].unsqueeze(1), sin[position].unsqueeze(1))
    assert torch.equal(by_token[:, :, :3], apply_rope(x[:, :, :3], cos, sin))
    assert torch.equal(by_token[:, :, 3:], apply_rope(x[:, :, 3:], cos, sin))


def test_gqa_shrinks_key_value_projection():
    full, mqa = GPT(tiny(n_kv_head=4)), GPT(tiny(n_kv_head=1))
    head_dim, kv_saved = 8, 2 * 3 * 8  # k and v, 3 heads fewer, width 8 each
    per_layer = kv_saved * 32 + kv_saved  # weights + biases
    assert full.num_params() - mqa.num_params() == 2 * per_layer
    assert head_dim == 32 // 4


def test_swiglu_width_keeps_parameters_comparable():
    config = tiny(n_embd=128, mlp="swiglu")
    assert config.mlp_hidden == 384  # 2/3 * 4 * 128 = 341.3, rounded up to a multiple of 64
    gelu = GPT(tiny(n_embd=128)).blocks[0].mlp
    swiglu = GPT(config).blocks[0].mlp
    ratio = sum(p.numel() for p in swiglu.parameters()) / sum(p.numel() for p in gelu.parameters())
    assert 1.0 <= ratio < 1.15


@pytest.mark.parametrize("kw, message", [
    (dict(n_embd=30), "CONFIG_N_EMBD=30 is not divisible by CONFIG_N_HEAD=4"),
    (dict(n_kv_head=3), "CONFIG_N_HEAD=4 is not divisible by CONFIG_N_KV_HEAD=3"),
    (dict(n_embd=12, n_head=4, n_kv_head=4, pos="rope"), "RoPE needs an even head width"),
])
def test_inconsistent_shapes_name_the_symbols(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="exceeds CONFIG_BLOCK_SIZE=16"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))


def test_generate_appends_tokens_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert a.shape == (1, 23) and torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    s = model.generate(idx, 20, temperature=1.0, top_k=5, generator=g)
    assert s.shape == (1, 23) and int(s.max()) < 64


def test_flops_per_token_formula():
    model = GPT(tiny())
    c = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
