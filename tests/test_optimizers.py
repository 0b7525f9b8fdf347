"""Optimizers and parameter groups: Lion against its definition, groups by rule, each optimizer trains,
Muon's implementations and its expert-stack group."""

from __future__ import annotations

import pytest
import torch

from conftest import config_of
from model.gpt import GPT, ModelConfig
from optim.lion import Lion
from optim.optimizers import OptimizerConfig, build_optimizer, describe, param_groups, set_lr


def optimizer(text: str = "") -> OptimizerConfig:
    return OptimizerConfig.from_config(config_of(text))


def lion_reference(p, g, m, lr, beta1, beta2, wd):
    """Lion, one tensor, written out as in the paper's Algorithm 2."""
    update = torch.sign(beta1 * m + (1 - beta1) * g)
    p = p * (1 - lr * wd) - lr * update
    return p, beta2 * m + (1 - beta2) * g


def test_lion_matches_its_definition():
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    ref = [p.detach().clone() for p in params]
    moms = [torch.zeros_like(p) for p in params]
    opt = Lion(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref[i], moms[i] = lion_reference(ref[i], g, moms[i], 0.01, 0.9, 0.99, 0.1)
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), r, atol=1e-6)


def test_lion_moves_every_element_by_exactly_lr():
    p = torch.zeros(100, requires_grad=True)
    p.grad = torch.randn(100)
    Lion([p], lr=0.5).step()
    assert torch.equal(p.detach().abs(), torch.full((100,), 0.5))


@pytest.mark.parametrize("tied", [True, False])
def test_groups_by_rule_cover_every_parameter_once(tied):
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                            tie_embeddings=tied))
    config = optimizer('EMBEDDING_LR_SCALE="5" HEAD_LR_SCALE="2" WEIGHT_DECAY="0.1"')
    groups = {g["name"]: g for g in param_groups(model, config)}
    assert set(groups) == ({"matrices", "embeddings", "vectors"} | (set() if tied else {"head"}))
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["vectors"]["weight_decay"] == 0 and groups["matrices"]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups["vectors"]["params"])
    assert any(p is model.wte.weight for p in groups["embeddings"]["params"])
    opt = torch.optim.AdamW(param_groups(model, config), lr=1.0)
    set_lr(opt, 1e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["embeddings"] == pytest.approx(5e-3) and lrs["matrices"] == pytest.approx(1e-3)
    assert tied or lrs["head"] == pytest.approx(2e-3)


@pytest.mark.parametrize("choice, kind, scale", [("OPT_ADAMW", torch.optim.AdamW, 1.0), ("OPT_LION", Lion, 0.3),
                                                  ("OPT_SGD", torch.optim.SGD, 50.0)])
def test_each_optimizer_is_built_at_its_scale(choice, kind, scale):
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    opt = build_optimizer(model, optimizer(f"{choice}=y LR=1e-3"), torch.device("cpu"))
    assert isinstance(opt, kind)
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * scale] * len(opt.param_groups))


def test_the_config_reads_the_choice_and_builds_without_kconfig():
    config = optimizer('OPT_MUON=y LR=2e-3 MUON_LR_SCALE="0.5" GRAD_CLIP="0"')
    assert (config.name, config.muon_impl, config.lr, config.muon_lr_scale, config.grad_clip) == \
        ("muon", "torch", 2e-3, 0.5, 0.0)
    assert config.schedule.lr == 2e-3 and config.schedule.shape == "cosine"
    assert optimizer("OPT_LION=y").muon_impl is None
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    direct = OptimizerConfig(name="lion", lr=1e-3, betas=(0.9, 0.99))
    opt = build_optimizer(model, direct, torch.device("cpu"))
    assert isinstance(opt, Lion) and opt.defaults["lr"] == pytest.approx(3e-4)  # LION_LR_SCALE's default 0.3
    assert opt.defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'.*CONFIG_OPTIMIZER"):
        OptimizerConfig(name="adam")
    with pytest.raises(ValueError, match=r"Muon needs muon_impl.*CONFIG_MUON_IMPL"):
        OptimizerConfig(name="muon")


@pytest.mark.parametrize("choice", ["OPT_LION", "OPT_SGD"])
def test_every_optimizer_trains(tmp_path, choice):
    from tests.test_trainer import run

    summary, _, logs = run(tmp_path, f"{choice}=y")
    assert summary["final_val_loss"] < summary["unigram_entropy_nats"] - 0.5, summary["final_val_loss"]
    assert any(f"optimizer: {'Lion' if choice == 'OPT_LION' else 'SGD'}" in m for m in logs)


def test_muon_updates_are_nearly_orthogonal_and_adamw_takes_the_rest():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    opt = build_optimizer(model, optimizer('OPT_MUON=y WEIGHT_DECAY="0"'), torch.device("cpu"))
    assert repr(opt) == "Muon + AdamW"
    muon, adamw = opt.optimizers
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert any(p is model.wte.weight for g in adamw.param_groups for p in g["params"])
    w = model.blocks[0].mlp.c_fc.weight
    before = w.detach().clone()
    grad = torch.randn(w.shape) @ torch.diag(torch.logspace(-1.5, 0, w.shape[1]))  # a spread-out spectrum
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = grad
    set_lr(opt, 1e-2)
    opt.step()
    update = torch.linalg.svdvals(before - w.detach())
    raw = torch.linalg.svdvals(grad)
    assert raw.max() / raw.min() > 20
    # Five quintic Newton-Schulz steps map every singular value into about [0.7, 1.2]: nearly orthogonal.
    assert update.max() / update.min() < 2.0, "Newton-Schulz flattens the spectrum"
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert len(state["optimizers"]) == 2


def test_muon_trains(tmp_path):
    from tests.test_trainer import run

    summary, _, logs = run(tmp_path, "OPT_MUON=y")
    assert summary["final_val_loss"] < summary["unigram_entropy_nats"] - 0.5
    assert any("optimizer: Muon + AdamW" in m for m in logs)


def test_memory_prediction_counts_each_optimizers_state():
    from train.memory import predict_memory
    from train.memory_measure import measure_peak_memory

    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=128)
    states = {}
    for choice, name in (("OPT_ADAMW", "adamw"), ("OPT_LION", "lion"), ("OPT_MUON", "muon")):
        model = GPT(mcfg)
        opt = build_optimizer(model, optimizer(f"{choice}=y"), torch.device("cpu"))
        batch = lambda: (torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64)))  # noqa: E731
        measured = measure_peak_memory(model, opt, batch)
        predicted = predict_memory(mcfg, 4, 64, "fp32", name)
        states[name] = predicted.optimizer_state
        assert predicted.total == pytest.approx(measured, rel=0.05), name
    assert states["lion"] < states["muon"] < states["adamw"]


class TinyMoE(torch.nn.Module):
    """The parameter shapes an MoE GPT gives the optimizer: an embedding, 2-D router and attention
    matrices, 3-D expert stacks (n_experts, in, out), a norm gain."""

    def __init__(self, n_embd=32, n_experts=4, hidden=64):
        super().__init__()
        self.wte = torch.nn.Embedding(64, n_embd)
        block = torch.nn.Module()
        block.attn = torch.nn.Linear(n_embd, n_embd, bias=False)
        block.mlp = torch.nn.Module()
        block.mlp.router = torch.nn.Linear(n_embd, n_experts, bias=False)
        block.mlp.w_in = torch.nn.Parameter(torch.randn(n_experts, n_embd, hidden) * 0.02)
        block.mlp.w_out = torch.nn.Parameter(torch.randn(n_experts, hidden, n_embd) * 0.02)
        block.ln = torch.nn.LayerNorm(n_embd, bias=False)
        self.blocks = torch.nn.ModuleList([block])


def muon_groups(opt):
    """(torch.Muon | optim.Muon | torch.AdamW, group name, shapes) for each group of a Composite."""
    return [(f"{type(o).__module__.partition('.')[0]}.{type(o).__name__}", g["name"],
             [tuple(p.shape) for p in g["params"]]) for o in opt.optimizers for g in o.param_groups]


def test_muon_sends_expert_stacks_to_the_compact_muon_and_names_each_implementation():
    torch.manual_seed(0)
    model = TinyMoE()
    opt = build_optimizer(model, optimizer("OPT_MUON=y"), torch.device("cpu"))
    assert muon_groups(opt) == [("torch.Muon", "matrices", [(32, 32), (4, 32)]),
                                ("optim.Muon", "experts", [(4, 32, 64), (4, 64, 32)]),
                                ("torch.AdamW", "embeddings", [(64, 32)]),
                                ("torch.AdamW", "vectors", [(32,)])]
    text = describe(opt)
    assert "group matrices: 2 tensors, 1,152 params, weight_decay=0.1, lr x1 [torch.optim.Muon, bf16" in text
    assert "group experts: 2 tensors, 16,384 params, weight_decay=0.1, lr x1 [compact Muon (optim/muon.py), " \
           "float32 Newton-Schulz]" in text
    w_in = model.blocks[0].mlp.w_in
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = w_in.detach().clone()
    set_lr(opt, 1e-2)
    opt.step()
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in (w_in, model.blocks[0].mlp.router.weight))
    assert set(opt.state[model.wte.weight]) >= {"exp_avg", "exp_avg_sq"}
    for e in range(4):  # each expert's update is orthogonalized on its own
        sv = torch.linalg.svdvals(before[e] * (1 - 1e-2 * 0.1) - w_in.detach()[e])
        assert sv.max() / sv.min() < 1.7
    opt.load_state_dict(opt.state_dict())


def test_compact_muon_takes_every_hidden_matrix():
    opt = build_optimizer(TinyMoE(), optimizer("OPT_MUON=y MUON_IMPL_COMPACT=y"), torch.device("cpu"))
    assert [(m, name) for m, name, _ in muon_groups(opt)] == [
        ("optim.Muon", "matrices"), ("optim.Muon", "experts"),
        ("torch.AdamW", "embeddings"), ("torch.AdamW", "vectors")]
    assert repr(opt) == "Muon + AdamW" and "note:" not in describe(opt)


def test_torch_without_muon_falls_back_to_the_compact_one_and_says_so(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    opt = build_optimizer(model, optimizer("OPT_MUON=y"), torch.device("cpu"))
    assert muon_groups(opt)[0][:2] == ("optim.Muon", "matrices")
    assert f"note: MUON_IMPL_TORCH: torch {torch.__version__} has no torch.optim.Muon" in describe(opt)


@pytest.mark.parametrize("amx", [True, False])
def test_muon_cpu_bf16_runs_newton_schulz_in_bf16_only_where_amx_makes_it_fast(monkeypatch, amx):
    """MUON_CPU_BF16 reaches the compact Muon's ns_dtype; a CPU without AMX keeps fp32 and the report says why.
    (AMX is monkeypatched both ways: the rule is tested, not this machine's CPU.)"""
    import optim.optimizers as optimizers
    from optim.muon import Muon

    monkeypatch.setattr(optimizers, "cpu_has_amx_bf16", lambda: amx)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    default = optimizer("OPT_MUON=y MUON_IMPL_COMPACT=y")
    assert default.muon_cpu_bf16 is False
    built = build_optimizer(model, default, torch.device("cpu"))
    assert [o.defaults["ns_dtype"] for o in built.optimizers if isinstance(o, Muon)] == [torch.float32]
    config = optimizer("OPT_MUON=y MUON_IMPL_COMPACT=y MUON_CPU_BF16=y")
    assert config.muon_cpu_bf16 is True
    built = build_optimizer(model, config, torch.device("cpu"))
    muons = [o for o in built.optimizers if isinstance(o, Muon)]
    assert [m.defaults["ns_dtype"] for m in muons] == [torch.bfloat16 if amx else torch.float32]
    assert any("no AMX bf16 units" in n for n in built.notes) == (not amx)
    # torch's own Muon is still chosen with MUON_IMPL_TORCH: the note does not count as a fallback
    torch_built = build_optimizer(model, optimizer("OPT_MUON=y MUON_IMPL_TORCH=y MUON_CPU_BF16=y"),
                                  torch.device("cpu"))
    assert any(isinstance(o, torch.optim.Muon) for o in torch_built.optimizers)
