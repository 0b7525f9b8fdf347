"""MoE layer (model/moe.py): routing, gates, losses, capacity, balancing and dispatch, checked against
a per-token reference loop and hand-built routings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import config_of
from model.mlp import hidden_width
from model.moe import MoE, MoEConfig, expert_matmul, grouped_mm_usable, is_moe_block

C, H, E = 16, 8, 4  # fp32 rows of 16 and 8 floats keep torch._grouped_mm's 16-byte alignment
GROUPED_MM_ON_CPU = grouped_mm_usable(torch.zeros(4, C), torch.zeros(E, C, H))


def make(mlp="gelu", seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    kw = {"n_experts": E, "top_k": 2, "expert_hidden": H, **kw}
    m = MoE(C, mlp, MoEConfig(**kw))
    m.reset_parameters(0.3, 0.3)  # large enough that routing and outputs are far from ties and zeros
    return m


def act(h, kind):
    if kind == "swiglu":
        gate, up = h[:h.numel() // 2], h[h.numel() // 2:]  # fused gate | up halves
        return F.silu(gate) * up
    if kind == "relu2":
        return torch.relu(h) ** 2
    return F.gelu(h)


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer written one token at a time: the definition the vectorized dispatch must match."""
    config = m.config
    xf = x.reshape(-1, C)
    out = torch.zeros_like(xf)
    for t in range(xf.size(0)):
        logits = m.router.weight @ xf[t]
        scores = logits.softmax(-1) if config.score == "softmax" else logits.sigmoid()
        chosen = torch.argsort(scores + m.expert_bias, descending=True)[:config.top_k]
        gates = scores[chosen]
        if config.top_k > 1:
            gates = gates / gates.sum()
        for e, g in zip(chosen, gates):
            out[t] += g * (act(xf[t] @ m.w_in[e], m.kind) @ m.w_out[e])
        if m.shared is not None:
            out[t] += m.shared.c_proj.weight @ act(m.shared.c_fc.weight @ xf[t], m.kind)
    return out.view_as(x)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "relu2"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_output_matches_per_token_reference(mlp, score, top_k, n_shared):
    m = make(mlp, score=score, top_k=top_k, n_shared=n_shared)
    m.expert_bias.copy_(torch.tensor([0.05, -0.1, 0.0, 0.08]))  # moves selection, never the gates
    x = torch.randn(2, 8, C)
    with torch.no_grad():
        expect = reference(m, x)
        for grouped in (True, False) if GROUPED_MM_ON_CPU else (False,):  # both dispatch paths
            m.use_grouped_mm = grouped
            y = m(x)
            assert y.shape == x.shape
            torch.testing.assert_close(y, expect, atol=1e-5, rtol=0)
    assert m.last["assignments"] == 16 * top_k
    assert m.last["load"].sum().item() == 16 * top_k and m.last["dropped"].item() == 0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_equal_bias_on_every_expert_changes_nothing(score):
    m = make(score=score)
    x = torch.randn(1, 20, C)
    with torch.no_grad():
        before = m(x)
        m.expert_bias.fill_(0.7)  # same selection; gates come from raw scores, so same output
        torch.testing.assert_close(m(x), before, atol=0, rtol=0)


def test_bias_selects_but_gates_use_raw_scores():
    m = make(top_k=2)
    m.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))  # forces experts 2 and 3 for every token
    x = torch.randn(1, 10, C)
    with torch.no_grad():
        y = m(x)
        p = (x[0] @ m.router.weight.T).softmax(-1)[:, 2:]
        g = p / p.sum(-1, keepdim=True)
        expect = sum(g[:, [j]] * (F.gelu(x[0] @ m.w_in[2 + j]) @ m.w_out[2 + j]) for j in range(2))
    torch.testing.assert_close(y[0], expect, atol=1e-5, rtol=0)
    assert m.last["load"].tolist() == [0, 0, 10, 10]


def routed_inputs(experts: list[list[int]], scale: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A router weight and tokens so token t picks exactly experts[t] (first choice strongest)."""
    w = torch.zeros(E, C)
    w[:, :E] = torch.eye(E) * scale
    x = torch.zeros(len(experts), C)
    for t, chosen in enumerate(experts):
        for rank, e in enumerate(chosen):
            x[t, e] = 1.0 - 0.25 * rank
    x[:, E:] = torch.randn(len(experts), C - E)  # routing ignores these channels, the experts do not
    return w, x.unsqueeze(0)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_at_perfect_balance_and_larger_when_skewed(score, top_k):
    m = make(score=score, top_k=top_k)
    w, x = routed_inputs([[t % E, (t + 1) % E][:top_k] for t in range(4 * E)])
    m.router.weight.data.copy_(w)
    m(x)
    assert m.last["load"].tolist() == [4 * top_k] * E
    assert m.last["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)
    w, x = routed_inputs([[0, 1][:top_k]] * (4 * E))
    m(x)
    assert m.last["load"][0].item() == 4 * E
    assert m.last["aux_loss"].item() > 1.2


def test_aux_and_z_loss_values_and_grad():
    m = make(aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 5, C)
    m(x)
    logits = x.reshape(-1, C) @ m.router.weight.T
    p = logits.softmax(-1).mean(0)
    f = m.last["load"] / m.last["assignments"]
    assert m.last["aux_loss"].item() == pytest.approx(E * (f * p).sum().item(), rel=1e-6)
    assert m.last["z_loss"].item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(), rel=1e-6)
    assert m.last["aux_loss"].requires_grad and m.last["z_loss"].requires_grad
    assert m.last["load"].dtype == torch.float32 and not m.last["load"].requires_grad
    off = make(aux_loss_coef=0.0, z_loss_coef=0.0)
    off(x)
    assert not off.last["aux_loss"].requires_grad and not off.last["z_loss"].requires_grad  # logged, not trained


def test_last_is_overwritten_every_forward():
    m = make(top_k=2)
    m(torch.randn(1, 10, C))
    m(torch.randn(1, 3, C))
    assert m.last["assignments"] == 6 and m.last["load"].sum().item() == 6


def test_capacity_drops_later_tokens_and_counts_them_exactly():
    N = 16  # all to expert 0, top-1, factor 1: capacity ceil(16 / 4) = 4, so 12 dropped
    m = make(top_k=1, capacity_factor=1.0)
    w, x = routed_inputs([[0]] * N)
    m.router.weight.data.copy_(w)
    with torch.no_grad():
        y = m(x)
        dropless = make(top_k=1)
        dropless.load_state_dict(m.state_dict())
        full = dropless(x)
    assert m.last["dropped"].item() == N - 4
    assert m.last["load"].tolist() == [N, 0, 0, 0]  # counted before dropping
    torch.testing.assert_close(y[0, :4], full[0, :4], atol=1e-6, rtol=0)  # the earliest tokens keep their expert
    assert torch.equal(y[0, 4:], torch.zeros(N - 4, C))  # dropped ones contribute nothing
    assert full[0, 4:].abs().min() > 0


def test_capacity_on_mixed_routing_and_top2():
    m = make(top_k=1, capacity_factor=1.0)  # loads 10, 4, 2, 0 against capacity 4: 6 dropped
    w, x = routed_inputs([[0]] * 10 + [[1]] * 4 + [[2]] * 2)
    m.router.weight.data.copy_(w)
    m(x)
    assert m.last["load"].tolist() == [10, 4, 2, 0] and m.last["dropped"].item() == 6

    m = make(top_k=2, capacity_factor=1.0, n_shared=1)  # 16 tokens to experts 0 and 1: capacity 8 each
    w, x = routed_inputs([[0, 1]] * 16)
    m.router.weight.data.copy_(w)
    with torch.no_grad():
        y = m(x)
        shared_only = m.shared(x)
    assert m.last["dropped"].item() == 2 * 8
    torch.testing.assert_close(y[0, 8:], shared_only[0, 8:], atol=1e-6, rtol=0)  # shared experts still run
    m.config = MoEConfig(n_experts=E, top_k=2, expert_hidden=H, n_shared=1, capacity_factor=2.0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(m, x), atol=1e-5, rtol=0)  # capacity 16: nothing dropped
    assert m.last["dropped"].item() == 0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_balancing_evens_out_a_skewed_router(score):
    m = make(score=score, top_k=2, bias_rate=0.01).eval()
    torch.manual_seed(1)
    u = torch.randn(C)
    m.router.weight.data += torch.outer(torch.tensor([0.75, 0.5, 0.25, 0.0]), u) / u.norm()  # favours expert 0
    first, recent = None, torch.zeros(E)
    with torch.no_grad():
        for step in range(50):  # one optimizer step per batch, as in training
            m(torch.randn(1, 128, C) + u)
            load = m.last["load"]
            first = load if first is None else first
            if step >= 40:
                recent += load
            m.update_bias(load)
    assert (first.max() / first.min().clamp(min=1)).item() > 10
    assert (recent.max() / recent.min()).item() < 1.5  # the last 10 batches' load is nearly uniform
    assert m.expert_bias[0] < 0 < m.expert_bias[3]


def test_update_bias_is_a_signed_step_and_off_at_zero_rate():
    m = make(bias_rate=0.1)
    m.update_bias(torch.tensor([4.0, 2.0, 1.0, 1.0]))  # mean 2
    torch.testing.assert_close(m.expert_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    off = make()
    off.update_bias(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    assert torch.equal(off.expert_bias, torch.zeros(E))


def test_router_is_fp32_and_experts_bf16_under_autocast():
    m = make(n_shared=1)
    seen = []
    router_logits = m.router_logits
    m.router_logits = lambda x: seen.append(router_logits(x)) or seen[-1]
    x = torch.randn(2, 8, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert seen[0].dtype == torch.float32 and m.last["aux_loss"].dtype == torch.float32
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0.05)


def test_jitter_only_in_training():
    m = make(jitter=0.5)
    plain = make()
    x = torch.randn(1, 32, C)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), plain(x), atol=0, rtol=0)
        m.train()
        assert not torch.allclose(m(x), plain(x))
        plain.train()
        torch.testing.assert_close(plain(x), plain.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_backward_reaches_every_parameter(grouped, mlp):
    if grouped and not GROUPED_MM_ON_CPU:
        pytest.skip("torch._grouped_mm does not run on CPU in this torch")
    m = make(mlp, n_shared=1, aux_loss_coef=0.01, z_loss_coef=0.001)
    m.use_grouped_mm = grouped
    y = m(torch.randn(2, 6, C))
    (y.square().sum() + m.last["aux_loss"] + m.last["z_loss"]).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grouped_mm_usability_rules():
    assert not grouped_mm_usable(torch.zeros(4, 5), torch.zeros(2, 5, 8))  # 20-byte rows
    assert not grouped_mm_usable(torch.zeros(4, 12, dtype=torch.bfloat16), torch.zeros(2, 12, 8, dtype=torch.bfloat16))
    assert not grouped_mm_usable(torch.zeros(4, 16), torch.zeros(2, 16, 8, dtype=torch.bfloat16))
    assert grouped_mm_usable(torch.zeros(4, 16), torch.zeros(2, 16, 8)) == hasattr(torch, "_grouped_mm")


@pytest.mark.skipif(not GROUPED_MM_ON_CPU, reason="torch._grouped_mm does not run on CPU in this torch")
def test_grouped_mm_and_expert_loop_agree():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no tokens included
    x = torch.randn(10, C, requires_grad=True)
    w = torch.randn(E, C, H, requires_grad=True)
    g = torch.randn(10, H)
    results = []
    for grouped in (True, False):
        x.grad = w.grad = None
        y = expert_matmul(x, w, counts, grouped)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    m = make("swiglu", top_k=2)
    x = torch.randn(2, 9, C)
    with torch.no_grad():
        m.use_grouped_mm = True
        a = m(x)
        m.use_grouped_mm = False
        torch.testing.assert_close(a, m(x), atol=1e-5, rtol=0)


def test_expert_bias_is_persistent_state():
    m = make()
    m.update_bias(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert "expert_bias" in m.state_dict()
    again = make(seed=1)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.expert_bias, m.expert_bias)


def test_reset_parameters_stds_and_residual_marks():
    torch.manual_seed(0)
    m = MoE(64, "gelu", MoEConfig(n_experts=8, top_k=2, expert_hidden=64, n_shared=2))
    m.reset_parameters(0.02, 0.005)
    assert m.w_in.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.w_out.std().item() == pytest.approx(0.005, rel=0.05)
    assert m.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.shared.c_proj.weight.std().item() == pytest.approx(0.005, rel=0.1)
    assert m.w_out.residual_scaled and m.shared.c_proj.residual_scaled


@pytest.mark.parametrize("mlp, per_expert", [("gelu", 2 * C * H), ("swiglu", 3 * C * H), ("relu2", 2 * C * H)])
def test_inactive_params(mlp, per_expert):
    m = make(mlp, n_experts=E, top_k=1, n_shared=1)
    assert m.inactive_params() == (E - 1) * per_expert
    routed = m.w_in.numel() + m.w_out.numel()
    assert routed == E * per_expert


@pytest.mark.parametrize("kw, symbol", [
    ({"top_k": 5}, "CONFIG_MOE_TOP_K=5"),
    ({"top_k": 0}, "CONFIG_MOE_TOP_K=0"),
    ({"n_experts": 0, "top_k": 1}, "CONFIG_MOE_EXPERTS=0"),
    ({"n_shared": -1}, "CONFIG_MOE_SHARED_EXPERTS"),
    ({"expert_hidden": 0}, "CONFIG_MOE_EXPERT_RATIO"),
    ({"score": "tanh"}, "CONFIG_MOE_SCORE"),
    ({"aux_loss_coef": -1.0}, "CONFIG_MOE_AUX_LOSS_COEF"),
    ({"z_loss_coef": -1.0}, "CONFIG_MOE_Z_LOSS_COEF"),
    ({"bias_rate": -0.1}, "CONFIG_MOE_BIAS_RATE"),
    ({"capacity_factor": -1.0}, "CONFIG_MOE_CAPACITY_FACTOR"),
    ({"jitter": 1.0}, "CONFIG_MOE_JITTER"),
])
def test_config_errors_name_the_symbol(kw, symbol):
    with pytest.raises(ValueError, match=symbol):
        MoEConfig(**{"n_experts": E, "expert_hidden": H, **kw})


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="'tanh'"):
        MoE(C, "tanh", MoEConfig(n_experts=E, expert_hidden=H))


def test_from_config_reads_the_kconfig_symbols():
    cfg = config_of("MOE=y MOE_EXPERTS=16 MOE_TOP_K=4 MOE_SHARED_EXPERTS=1 MOE_SCORE_SIGMOID=y MOE_BIAS_RATE=0.001 "
                    "MOE_CAPACITY_FACTOR=1.25 MOE_JITTER=0.01")
    got = MoEConfig.from_config(cfg, expert_hidden=hidden_width(cfg.N_EMBD, cfg.MOE_EXPERT_RATIO, "gelu"))
    assert got == MoEConfig(n_experts=16, top_k=4, n_shared=1, expert_hidden=2 * cfg.N_EMBD, score="sigmoid",
                            aux_loss_coef=0.01, z_loss_coef=0.001, bias_rate=0.001, capacity_factor=1.25,
                            jitter=0.01)
    defaults = MoEConfig.from_config(config_of("MOE=y"), expert_hidden=64)
    assert (defaults.n_experts, defaults.top_k, defaults.score, defaults.capacity_factor) == (8, 2, "softmax", 0.0)
    with pytest.raises(ValueError, match="CONFIG_MOE=y"):
        MoEConfig.from_config(config_of(), expert_hidden=64)


def test_expert_width_and_block_placement():
    assert hidden_width(768, 2.0, "gelu") == 1536
    assert hidden_width(768, 2.0, "swiglu") == 64 * math.ceil(1024 / 64)  # 2/3 of 1536
    assert [is_moe_block(i, every=2, first_dense=1) for i in range(6)] == [False, True, False, True, False, True]
    assert [is_moe_block(i, every=1, first_dense=0) for i in range(3)] == [True, True, True]
