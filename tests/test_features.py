"""Model-level features composed in model/gpt.py: multi-token prediction, activation checkpointing,
MoE blocks (active parameters, FLOPs, loss terms) and their checkpoint round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import config_of
from model.gpt import GPT, ModelConfig
from model.moe import MoE, MoEConfig


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    return ModelConfig(**{**base, **kw})


def batch(config: ModelConfig, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (b, config.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_mtp_heads_add_their_weighted_loss_in_training_only():
    torch.manual_seed(0)
    model = GPT(tiny(mtp_heads=2, mtp_weight=0.5))
    x, y = batch(model.config)
    _, objective = model(x, y)
    parts = model.loss_parts
    assert set(parts) == {"lm_loss", "mtp_loss"}
    assert objective.item() == pytest.approx(parts["lm_loss"].item() + 0.5 * parts["mtp_loss"].item(), rel=1e-6)
    # Head j predicts token t+1+j: recompute its loss by hand from the trunk's hidden states.
    hidden = {}
    model.blocks[-1].register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
    model(x, y)
    h = hidden["h"]
    rope, mask = (model.rope_cos, model.rope_sin), model._attention_mask(x.size(1), x.device)
    by_hand = []
    for j, block in enumerate(model.mtp_blocks, start=1):
        logits = model._logits(block(h, rope, mask))[:, :-j]
        by_hand.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, j:].reshape(-1)))
    assert model.loss_parts["mtp_loss"].item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)
    model.eval()
    _, val = model(x, y)
    assert val.item() == pytest.approx(parts["lm_loss"].item(), rel=1e-6), "eval reports the next-token loss"


def test_mtp_blocks_get_gradients_and_sampling_ignores_them():
    torch.manual_seed(0)
    model = GPT(tiny(mtp_heads=1, mtp_weight=0.3))
    x, y = batch(model.config)
    model(x, y)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp_blocks.parameters())
    base = GPT(tiny())
    assert model.num_params() - base.num_params() == sum(p.numel() for p in model.mtp_blocks.parameters())
    assert model.flops_per_token() > base.flops_per_token()
    out = model.generate(x[:1, :4], 5, temperature=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    config = tiny(n_layer=3, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, jitter=0.1), mtp_heads=1,
                  mtp_weight=0.3)
    grads = []
    for ckpt in (0, every):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(config, checkpoint_every=ckpt))
        assert model.checkpoint_every == ckpt
        x, y = batch(config)
        torch.manual_seed(1)  # the same jitter noise; checkpointing replays the RNG state
        model(x, y)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_moe_blocks_follow_every_and_first_dense():
    moe = MoEConfig(n_experts=4, top_k=1, expert_hidden=32)
    model = GPT(tiny(n_layer=5, moe=moe, moe_every=2, moe_first_dense=1))
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, False, True, False]
    with pytest.raises(ValueError, match="CONFIG_MOE_FIRST_DENSE=2 and CONFIG_MOE_EVERY=1"):
        ModelConfig(**{**dataclasses.asdict(tiny(n_layer=2)), "moe": moe, "moe_first_dense": 2})


def test_moe_active_params_flops_and_loss_terms():
    moe = MoEConfig(n_experts=8, top_k=2, expert_hidden=32, aux_loss_coef=0.01, z_loss_coef=0.001)
    torch.manual_seed(0)
    model = GPT(tiny(moe=moe))
    per_expert = 32 * 32 * 3  # swiglu: gate|up (C x 2H) and down (H x C)
    assert model.num_params() - model.active_params() == 2 * 6 * per_expert  # 2 layers x 6 idle experts
    c = model.config
    assert model.flops_per_token() == 6 * model.active_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
    x, y = batch(c)
    _, objective = model(x, y)
    p = model.loss_parts
    assert p["moe_aux_loss"].item() >= 1.0 - 1e-6  # Switch loss: 1 at perfect balance, more otherwise
    expected = p["lm_loss"] + 0.01 * p["moe_aux_loss"] + 0.001 * p["moe_z_loss"]
    assert objective.item() == pytest.approx(expected.item(), rel=1e-6)
    objective.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0, "the aux and z losses reach the router"


def test_model_config_round_trips_through_a_checkpoint_dict():
    config = tiny(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32), mtp_heads=1, mtp_weight=0.3)
    assert ModelConfig.from_dict(dataclasses.asdict(config)) == config
    assert ModelConfig.from_dict(dataclasses.asdict(tiny())) == tiny()


def test_a_checkpoint_written_before_checkpoint_every_existed_still_loads():
    saved = dataclasses.asdict(tiny(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32)))
    del saved["checkpoint_every"]
    loaded = ModelConfig.from_dict(saved)
    assert loaded.checkpoint_every == 0 and loaded == tiny(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
    assert GPT(loaded).checkpoint_every == 0


@pytest.mark.parametrize("sets, every", [("", 0), ("ACT_CKPT=y", 1), ("ACT_CKPT=y ACT_CKPT_EVERY=3", 3)])
def test_activation_checkpointing_comes_from_the_config(sets, every):
    config = ModelConfig.from_config(config_of(sets), 64)
    assert config.checkpoint_every == every
    assert GPT(config).checkpoint_every == every
    with pytest.raises(ValueError, match="checkpoint_every=-1 must be >= 0"):
        tiny(checkpoint_every=-1)
