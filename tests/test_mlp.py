"""model/mlp.py: one MLP module, one registry of activations, one hidden-width and one fan-out rule,
shared by dense blocks and MoE experts; the Kconfig choice MLP and the registry name the same set."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import config_of
from kconfig.tree import new_kconfig
from kconfig.values import option_values
from model.gpt import GPT, ModelConfig
from model.mlp import ACTIVATIONS, MLP, Activation, UnknownActivation, activation, fan_out, hidden_width
from model.moe import MoE, MoEConfig
from train.memory import predict_memory
from train.memory_measure import measure_peak_memory

# The formula each activation computes, written out from its definition (h: c_fc's output).
REFERENCE = {
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "relu2": lambda h: torch.clamp(h, min=0) ** 2,
    "swiglu": lambda h: h[..., :h.size(-1) // 2] * torch.sigmoid(h[..., :h.size(-1) // 2]) * h[..., h.size(-1) // 2:],
    # GEGLU (Shazeer 2020) with the tanh GELU of T5 v1.1 and Gemma: gelu(gate) * up
    "geglu": lambda h: (0.5 * h[..., :h.size(-1) // 2] * (1 + torch.tanh(math.sqrt(2 / math.pi) * (
        h[..., :h.size(-1) // 2] + 0.044715 * h[..., :h.size(-1) // 2] ** 3)))) * h[..., h.size(-1) // 2:],
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


def test_the_kconfig_choice_and_the_registry_name_the_same_activations():
    assert set(option_values(new_kconfig().named_choices["MLP"])) == set(ACTIVATIONS)
    assert set(REFERENCE) == set(ACTIVATIONS), "every activation has a reference formula here"


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_mlp_output_matches_the_written_out_formula(name):
    torch.manual_seed(0)
    mlp = MLP(16, 24, name, bias=True)
    x = torch.randn(2, 5, 16)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    expect = REFERENCE[name](h) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expect, atol=1e-6, rtol=1e-5)
    assert mlp.c_fc.weight.shape == (fan_out(24, name), 16) and mlp.c_proj.weight.shape == (16, 24)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_hidden_width_and_fan_out_follow_gating(name):
    gated = activation(name).gated
    assert hidden_width(128, 4.0, name) == (384 if gated else 512)  # 2/3 of 512, rounded up to 64
    assert fan_out(100, name) == (200 if gated else 100)
    assert tiny(n_embd=128, mlp=name).mlp_hidden == hidden_width(128, 4.0, name)


def test_gated_and_plain_mlps_have_comparable_parameters():
    counts = {name: sum(p.numel() for p in MLP(768, hidden_width(768, 4.0, name), name, bias=False).parameters())
              for name in ACTIVATIONS}
    for name, n in counts.items():
        assert n / counts["gelu"] == pytest.approx(1.0, abs=0.01 if activation(name).gated else 0), name


def test_dense_blocks_and_shared_experts_use_the_one_mlp_module():
    moe = MoEConfig(n_experts=4, top_k=2, n_shared=1, expert_hidden=32)
    model = GPT(tiny(n_layer=2, moe=moe, moe_first_dense=1, mlp="swiglu", dropout=0.1))
    dense, routed = model.blocks[0].mlp, model.blocks[1].mlp
    assert type(dense) is MLP and isinstance(routed, MoE) and type(routed.shared) is MLP
    assert dense.c_fc.bias is not None and dense.dropout.p == 0.1
    assert routed.shared.c_fc.bias is None and routed.shared.dropout.p == 0.0
    assert routed.activation is dense.activation is ACTIVATIONS["swiglu"]
    assert routed.w_in.shape[-1] == fan_out(32, "swiglu")


def test_an_unknown_activation_is_a_named_error():
    with pytest.raises(UnknownActivation, match="unknown MLP activation 'tanh' \\(CONFIG_MLP\\)"):
        tiny(mlp="tanh")
    with pytest.raises(ValueError, match="'tanh'"):
        MLP(16, 32, "tanh", bias=False)


def test_a_new_activation_needs_only_its_registry_entry(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, "tanh", Activation("tanh", gated=False, fn=torch.tanh))
    torch.manual_seed(0)
    model = GPT(tiny(mlp="tanh"))
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    mlp = model.blocks[0].mlp
    h = torch.randn(3, 32)
    torch.testing.assert_close(mlp.activation(h), torch.tanh(h))


def test_from_config_reads_each_choice_as_its_value():
    config = ModelConfig.from_config(config_of("MLP_SWIGLU=y NORM_RMSNORM=y POS_ROPE=y ATTN_REFERENCE=y "
                                               "MOE=y MOE_SCORE_SIGMOID=y"), 64)
    assert (config.mlp, config.norm, config.pos, config.attn, config.moe.score) == (
        "swiglu", "rmsnorm", "rope", "reference", "sigmoid")
    assert config.moe.expert_hidden == hidden_width(config.n_embd, 2.0, "swiglu")
    default = ModelConfig.from_config(config_of(), 64)
    assert (default.mlp, default.norm, default.pos, default.attn, default.moe) == (
        "gelu", "layernorm", "learned", "sdpa", None)



@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm under CPU autocast
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=4, top_k=2, n_shared=1, expert_hidden=128)],
                         ids=["dense", "moe-shared"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_memory_prediction_matches_the_measured_peak_for_every_activation(name, moe, dtype):
    """Each activation's memory factors (model/mlp.py) against two CPU training steps, within the 5%
    tests/test_memory.py holds every configuration to."""
    config = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=128, mlp=name,
                         norm="rmsnorm", pos="rope", bias=False, moe=moe)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(1)
    make_batch = lambda: (torch.randint(0, 256, (8, 64), generator=gen),) * 2  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = measure_peak_memory(model, optimizer, make_batch, dtype)
    finally:
        torch.set_num_threads(threads)
    predicted = predict_memory(config, 8, 64, dtype).total
    assert abs(predicted - measured) / measured <= 0.05, f"{name}: predicted {predicted:,} B, measured {measured:,} B"


def test_geglu_is_swiglu_shaped_with_a_gelu_gate():
    """CONFIG_MLP_GEGLU: the fragment selects it, and it has SwiGLU's shapes and parameter count."""
    fragment = (Path(__file__).parent.parent / "defconfigs" / "fragments" / "geglu").read_text().splitlines()
    assert fragment[0].startswith("# ") and fragment[1:] == ["CONFIG_MLP_GEGLU=y"]
    config = ModelConfig.from_config(config_of(fragment[1].removeprefix("CONFIG_")), 64)
    assert config.mlp == "geglu" and activation("geglu").gated
    torch.manual_seed(0)
    geglu, swiglu = GPT(config), GPT(dataclasses.replace(config, mlp="swiglu"))
    assert geglu.num_params() == swiglu.num_params()
    assert geglu.blocks[0].mlp.c_fc.weight.shape == swiglu.blocks[0].mlp.c_fc.weight.shape
    x = torch.randint(0, 64, (2, 32))
    logits, loss = geglu(x, x)
    assert logits.shape == (2, 32, 64)
    loss.backward()
    h = torch.randn(4, 2 * 24)
    assert not torch.allclose(ACTIVATIONS["geglu"](h), ACTIVATIONS["swiglu"](h))
