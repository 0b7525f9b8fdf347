"""Every ModelConfig (and MoEConfig) field changes what GPT builds or computes.

tests/test_menus_reach_configs.py holds each Model-menu symbol to its config field; this holds each
field to its consumer. A field the model never reads (rope tables built with a fixed theta, an MLP
ignoring its ratio) passes every shape test and trains. For each field, one value away from its
default (on a base where it applies) must change the model's fingerprint: parameter shapes, the
training-mode logits and loss on a fixed batch under a fixed seed, how many block forwards a
forward and backward run (activation checkpointing recomputes), and the MoE expert biases after one
balancing update. Fields whose value by design changes none of that are listed with the reason.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.gpt import GPT, ModelConfig
from model.moe import MoEConfig

BASE = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
MOE = MoEConfig(n_experts=4, top_k=2, expert_hidden=32)

# field -> (what the base needs for the field to apply, the varied value)
MODEL_FIELDS = {
    "vocab_size": ({}, 96),
    "block_size": ({}, 32),
    "n_layer": ({}, 3),
    "n_head": ({"n_kv_head": 1}, 2),
    "n_kv_head": ({}, 2),
    "n_embd": ({}, 64),
    "norm": ({}, "rmsnorm"),
    "pos": ({}, "rope"),
    "rope_theta": ({"pos": "rope"}, 50.0),
    "mlp": ({}, "swiglu"),
    "mlp_ratio": ({}, 2.0),
    "qk_norm": ({}, True),
    "bias": ({}, False),
    "dropout": ({}, 0.2),
    "tie_embeddings": ({}, False),
    "init_std": ({}, 0.05),
    "attn_window": ({}, 4),
    "attn_softcap": ({"attn": "reference"}, 0.01),
    "final_logit_softcap": ({}, 0.01),
    "mtp_heads": ({}, 1),
    "mtp_weight": ({"mtp_heads": 1}, 0.5),
    "moe": ({}, MOE),
    "moe_every": ({"moe": MOE}, 2),
    "moe_first_dense": ({"moe": MOE}, 1),
    "checkpoint_every": ({}, 1),
}
SAME_FUNCTION = {
    "attn": "the kernels compute one function (tests/test_attention.py holds them equal)",
}
MOE_FIELDS = {
    "n_experts": 8,
    "top_k": 1,
    "n_shared": 1,
    "expert_hidden": 16,
    "score": "sigmoid",
    "aux_loss_coef": 0.5,
    "z_loss_coef": 0.5,
    "bias_rate": 0.1,
    "capacity_factor": 0.5,
    "jitter": 0.5,
}


def fingerprint(config: ModelConfig) -> tuple:
    torch.manual_seed(0)
    model = GPT(config).train()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    calls = []
    model.blocks[0].ln_1.register_forward_hook(lambda *args: calls.append(1))  # fires again when recomputed
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    logits, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    biases = []
    for moe in model.moe_layers:  # one aux-loss-free balancing step on an uneven load
        moe.update_bias(torch.arange(moe.config.n_experts, dtype=torch.float32))
        biases.append(moe.expert_bias.clone())
    return shapes, logits.detach(), loss.item(), len(calls), biases


def differ(a: tuple, b: tuple) -> bool:
    shapes_a, logits_a, loss_a, calls_a, biases_a = a
    shapes_b, logits_b, loss_b, calls_b, biases_b = b
    if shapes_a != shapes_b or calls_a != calls_b or loss_a != loss_b:
        return True
    return not torch.equal(logits_a, logits_b) or not all(torch.equal(x, y) for x, y in zip(biases_a, biases_b))


def test_the_tables_name_every_field():
    assert set(MODEL_FIELDS) | set(SAME_FUNCTION) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(MOE_FIELDS) == {f.name for f in dataclasses.fields(MoEConfig)}


@pytest.mark.parametrize("field", sorted(MODEL_FIELDS))
def test_each_model_field_changes_the_model(field):
    base, value = MODEL_FIELDS[field]
    before = ModelConfig(**{**BASE, **base})
    assert getattr(before, field) != value
    after = dataclasses.replace(before, **{field: value})
    assert differ(fingerprint(before), fingerprint(after)), f"{field}={value!r} changed nothing GPT builds or computes"


@pytest.mark.parametrize("field", sorted(MOE_FIELDS))
def test_each_moe_field_changes_the_model(field):
    before = ModelConfig(**BASE, moe=MOE)
    assert getattr(MOE, field) != MOE_FIELDS[field]
    after = dataclasses.replace(before, moe=dataclasses.replace(MOE, **{field: MOE_FIELDS[field]}))
    assert differ(fingerprint(before), fingerprint(after)), f"moe.{field} changed nothing GPT builds or computes"


def test_the_same_function_fields_keep_the_numbers_within_rounding():
    a = fingerprint(ModelConfig(**BASE))
    b = fingerprint(ModelConfig(**BASE, attn="reference"))
    assert a[0] == b[0] and abs(a[2] - b[2]) < 1e-5 and torch.allclose(a[1], b[1], atol=1e-5)
