"""model/attention.py: the backends agree, windows and soft-caps do what they say, and the
configurations that cannot work are refused with the option named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import config_of
from kconfig.errors import ConfigError
from kconfig.tree import parse_overrides, resolve
from model.attention import FlashAttentionUnavailable, causal_mask, reference_attention, sdpa_attention, softcap
from model.gpt import GPT, ModelConfig
from model.norm import RMSNorm, rms_norm
from test_model import rope_by_halves

TOL = 1e-5  # fp32 absolute tolerance between SDPA and the reference (seen: ~1e-7)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("window", [0, 1, 5])
@pytest.mark.parametrize("n_kv_head, pos, qk_norm", [(4, "learned", False), (2, "rope", True), (1, "rope", False)])
def test_sdpa_and_reference_agree(window, n_kv_head, pos, qk_norm):
    """Same weights, same input: the whole model's logits match under SDPA and the reference."""
    kw = dict(attn_window=window, n_kv_head=n_kv_head, pos=pos, qk_norm=qk_norm, norm="rmsnorm")
    torch.manual_seed(0)
    sdpa = GPT(tiny(**kw)).eval()
    ref = GPT(tiny(attn="reference", **kw)).eval()
    ref.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        a, _ = sdpa(x, x)
        b, _ = ref(x, x)
    assert torch.allclose(a, b, atol=TOL), (a - b).abs().max()


def test_kernels_agree_on_raw_tensors():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    for window in (0, 3):
        mask = causal_mask(12, window)
        y_ref = reference_attention(q, k, v, mask)
        y_sdpa = sdpa_attention(q, k, v, mask if window else None)
        assert torch.allclose(y_ref, y_sdpa, atol=TOL)


def test_causal_mask_is_the_last_n_tokens_including_the_current_one():
    m = causal_mask(6, 3)
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert torch.equal(causal_mask(6, 0), torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(causal_mask(6, 6), causal_mask(6, 0))  # a window >= T is full causal


@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_token_outside_the_window_does_not_influence_the_output(attn):
    """One layer, window 4: position 10 sees tokens 7..10. Changing token 6 leaves it unchanged;
    changing token 7 changes it. (Learned positions: no other path carries token 6 forward.)"""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=1, attn=attn, attn_window=4)).eval()
    x = torch.randint(0, 64, (1, 16))
    outside, inside = x.clone(), x.clone()
    outside[0, 6] = (x[0, 6] + 1) % 64
    inside[0, 7] = (x[0, 7] + 1) % 64
    with torch.no_grad():
        base, o, i = (model(t, t)[0][0, 10] for t in (x, outside, inside))
    assert torch.allclose(base, o, atol=1e-6)
    assert not torch.allclose(base, i, atol=1e-4)


def test_softcap_is_c_tanh_x_over_c_on_a_hand_example():
    x = torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0])
    expected = torch.tensor([-10.0, -0.9966800, 0.0, 1.9737532, 10.0])  # 10 * tanh(x / 10)
    assert torch.allclose(softcap(x, 10.0), expected, atol=1e-5)
    assert torch.equal(softcap(x, 0.0), x)  # 0 = off


def test_attention_softcap_bounds_the_scores():
    """With v = identity the output rows are the attention weights. Capped at c, every score lies in
    (-c, c), so among visible keys log(max weight / min weight) <= 2c; uncapped, the weights of these
    huge scores are one-hot. The weights equal softmax(c * tanh(s / c)) computed by hand."""
    torch.manual_seed(0)
    T, c = 8, 1.5
    q, k = 30 * torch.randn(1, 1, T, 4), 30 * torch.randn(1, 1, T, 4)
    eye, mask = torch.eye(T).reshape(1, 1, T, T), causal_mask(T, 0)
    capped = reference_attention(q, k, eye, mask, cap=c)[0, 0]
    for i in range(T):
        row = capped[i, : i + 1]
        assert (row.max() / row.min()).log() <= 2 * c + 1e-4  # tanh saturates to exactly c in fp32
    s = (q @ k.transpose(-2, -1))[0, 0] / 2.0  # 1/sqrt(head_dim 4)
    by_hand = torch.softmax((c * torch.tanh(s / c)).masked_fill(~mask, float("-inf")), dim=-1)
    assert torch.allclose(capped, by_hand, atol=1e-6)
    assert reference_attention(q, k, eye, mask)[0, 0][mask].min() < 1e-6  # uncapped: some weights vanish


def test_final_logit_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = GPT(tiny(final_logit_softcap=0.5, init_std=1.0)).eval()
    plain = GPT(tiny(init_std=1.0)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        capped, _ = model(x, x)
        raw, _ = plain(x, x)
    assert raw.abs().max() > 0.5 and capped.abs().max() <= 0.5
    assert torch.allclose(capped, 0.5 * torch.tanh(raw / 0.5), atol=1e-5)


def test_flash_without_cuda_names_the_option_and_the_fix():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(FlashAttentionUnavailable) as e:
        GPT(tiny(attn="flash"))
    msg = str(e.value)
    assert "CONFIG_ATTN is flash" in msg and "pip install flash-attn" in msg and "compute capability 8.0" in msg


def test_kconfig_rejects_softcap_with_sdpa_naming_the_dependency():
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides("ATTN_SOFTCAP=30"))
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("SET:1: CONFIG_ATTN_SOFTCAP=30: did not take: unmet dependency !ATTN_SDPA")


def test_kconfig_options_reach_the_model():
    m = ModelConfig.from_config(config_of("ATTN_REFERENCE=y ATTN_SOFTCAP=30 ATTN_WINDOW=8 FINAL_LOGIT_SOFTCAP=15"), 64)
    assert (m.attn, m.attn_window, m.attn_softcap, m.final_logit_softcap) == ("reference", 8, 30.0, 15.0)
    m = ModelConfig.from_config(config_of(), 64)
    assert (m.attn, m.attn_window, m.attn_softcap, m.final_logit_softcap) == ("sdpa", 0, 0.0, 0.0)
    assert ModelConfig.from_config(config_of("ATTN_FLASH=y"), 64).attn == "flash"


def test_softcap_with_sdpa_is_refused_when_built_directly():
    with pytest.raises(ValueError, match="CONFIG_ATTN_SOFTCAP=30.0 needs the flash or reference attention kernel"):
        tiny(attn_softcap=30.0)


def test_causal_mask_with_an_offset_is_the_last_rows_of_the_full_mask():
    """A KV cache's step: queries at positions offset.. over every key so far."""
    for window in (0, 3):
        full = causal_mask(7, window)
        assert torch.equal(causal_mask(2, window, offset=5), full[5:])
        assert torch.equal(causal_mask(7, window, offset=0), full)
    assert causal_mask(1, 3, offset=6)[0].tolist() == [False] * 4 + [True] * 3


def attention_by_parts(attn, x: torch.Tensor) -> torch.Tensor:
    """The oracle: attention with torch's RMSNorm for QK-norm (autograd's backward) and RoPE by
    halves, full causal SDPA."""
    c = attn.config
    B, T, C = x.shape
    kv = c.n_kv_head * c.head_dim
    q, k, v = attn.c_attn(x).split([C, kv, kv], dim=2)
    q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
    k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
    v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
    if c.qk_norm:
        q = F.rms_norm(q, (c.head_dim,), attn.q_norm.weight, attn.q_norm.eps)
        k = F.rms_norm(k, (c.head_dim,), attn.k_norm.weight, attn.k_norm.eps)
    if c.pos == "rope":
        q, k = rope_by_halves(q, c.rope_theta), rope_by_halves(k, c.rope_theta)
    y = sdpa_attention(q, k, v, None)
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


# (options, tolerance): 0 = equal to the last bit. QK-norm's backward (model/norm.py) is autograd's
# math in another order.
FASTER = [(dict(norm="rmsnorm", pos="rope"), 0.0),
          (dict(norm="rmsnorm", pos="learned", qk_norm=True, n_kv_head=2), 1e-5),
          (dict(norm="rmsnorm", pos="rope", qk_norm=True, n_kv_head=1), 1e-5)]


@pytest.mark.parametrize("options, tol", FASTER)
def test_attention_with_qk_norm_and_rope_equals_torchs_norm_and_rope_by_halves(options, tol):
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    attn = model.blocks[0].attn
    for p in attn.parameters():  # norms away from their init, so their weights matter
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 16, 32, requires_grad=True)
    rope = (model.rope_cos, model.rope_sin) if model.config.pos == "rope" else None
    new = attn(x, rope, None)
    grad = torch.randn_like(new)
    new_grads = torch.autograd.grad(new, [x, *attn.parameters()], grad)
    old = attention_by_parts(attn, x)
    old_grads = torch.autograd.grad(old, [x, *attn.parameters()], grad)
    names = ["x", *(n for n, _ in attn.named_parameters())]
    if tol == 0:
        assert torch.equal(new, old)
        for name, a, b in zip(names, new_grads, old_grads):
            assert torch.equal(a, b), name
    else:
        assert torch.allclose(new, old, rtol=tol, atol=tol), (new - old).abs().max()
        for name, a, b in zip(names, new_grads, old_grads):
            assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item()), (name, (a - b).abs().max())


def test_rms_norm_with_its_own_backward_equals_torchs():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 16, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(16)).requires_grad_()
    grad = torch.randn(2, 6, 8, 16)
    new = rms_norm(x, weight, 1e-6)
    ours = torch.autograd.grad(new, [x, weight], grad)
    old = F.rms_norm(x, (16,), weight, 1e-6)
    theirs = torch.autograd.grad(old, [x, weight], grad)
    assert torch.allclose(new, old, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    assert torch.equal(RMSNorm(16, eps=1e-6).state_dict()["weight"], torch.nn.RMSNorm(16).state_dict()["weight"])


def test_rms_norm_of_a_low_precision_input_is_torchs():
    x, weight = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(16)
    assert torch.equal(rms_norm(x, weight, 1e-6), F.rms_norm(x, (16,), weight, 1e-6))
