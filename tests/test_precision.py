"""FP8 training (train/precision.py): which layers convert, that emulated FP8 quantizes and still
trains, device and package errors, TransformerEngine wiring (through a stand-in module), Kconfig."""

from __future__ import annotations

import contextlib
import copy
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import config_of
from kconfig.errors import ConfigError
from model.gpt import GPT, ModelConfig
from train import precision
from train.precision import (Fp8Config, apply_fp8, fp8_autocast, fp8_eligible, require_fp8_device,
                             te_shape_problems, te_token_problem)

Float8Linear = pytest.importorskip("torchao.float8.float8_linear").Float8Linear
CPU = torch.device("cpu")
BLOCK_LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Emulated FP8 is many small ops; one thread is several times faster on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fp8(text: str = "") -> Fp8Config:
    """The FP8 settings of a configuration (SET syntax), through the real Kconfig."""
    return Fp8Config.from_config(config_of(text))


NONE = fp8()
TORCHAO = fp8("DEVICE_CPU=y FP8_TORCHAO=y")  # emulated: FP8_EMULATE defaults to y on a CPU config
TE = fp8("DEVICE_CUDA=y FP8_TE=y")


def small_gpt(n_embd: int = 64, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 128, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": n_embd, "block_size": 32}
    return GPT(ModelConfig(**{**cfg, **kw}))


# --------------------------------------------------------------------------- configuration


def test_backend_and_recipes_follow_the_choices():
    assert NONE == Fp8Config(backend="none", recipe=None, emulate=False, te_recipe=None) == Fp8Config()
    assert TORCHAO == Fp8Config(backend="torchao", recipe="tensorwise", emulate=True)
    assert fp8("DEVICE_CPU=y FP8_TORCHAO=y FP8_RECIPE_ROWWISE=y").recipe == "rowwise"
    assert TE == Fp8Config(backend="te", te_recipe="delayed")
    assert fp8("DEVICE_CUDA=y FP8_TE=y TE_RECIPE_CURRENT=y").te_recipe == "current"
    assert not fp8("DEVICE_CUDA=y FP8_TORCHAO=y").emulate, "FP8_EMULATE defaults to n off CPU"
    assert [c.needs_fp8_gpu for c in (NONE, TORCHAO, fp8("FP8_TORCHAO=y FP8_EMULATE=n"), TE)] == \
        [False, False, True, True]
    assert apply_fp8(small_gpt(), NONE, CPU) == {"backend": None, "converted": [], "kept": [], "fused": []}


def test_the_config_refuses_what_kconfig_would():
    with pytest.raises(ValueError, match=r"unknown FP8 backend 'fp8'.*CONFIG_FP8"):
        Fp8Config(backend="fp8")
    with pytest.raises(ValueError, match=r"torchao FP8 needs a recipe.*CONFIG_FP8_RECIPE"):
        Fp8Config(backend="torchao")
    with pytest.raises(ValueError, match=r"TransformerEngine FP8 needs a recipe.*CONFIG_TE_RECIPE"):
        Fp8Config(backend="te", te_recipe="later")


@pytest.mark.parametrize("overrides, symbol, dependency", [
    ("DEVICE_CPU=y FP8_TE=y", "FP8_TE", "!DEVICE_CPU"),
    ("DTYPE_FP16=y FP8_TORCHAO=y", "FP8_TORCHAO", "!DTYPE_FP16"),
    ("DTYPE_FP16=y FP8_TE=y", "FP8_TE", "!DTYPE_FP16"),
    ("FP8_RECIPE_ROWWISE=y", "FP8_RECIPE_ROWWISE", "FP8_TORCHAO"),
    ("FP8_EMULATE=y", "FP8_EMULATE", "FP8_TORCHAO"),
])
def test_kconfig_rejects_fp8_where_it_cannot_run(overrides, symbol, dependency):
    with pytest.raises(ConfigError) as e:
        config_of(overrides)
    [problem] = e.value.problems
    assert f"CONFIG_{symbol}=y: did not take: unmet dependency" in problem and dependency in problem


# --------------------------------------------------------------------------- which layers convert


def test_eligible_means_linear_with_dims_multiple_of_16_and_not_the_head():
    assert fp8_eligible("blocks.0.mlp.c_fc", nn.Linear(64, 256))
    assert not fp8_eligible("lm_head", nn.Linear(64, 128))
    assert not fp8_eligible("_orig_mod.lm_head", nn.Linear(64, 128))
    assert not fp8_eligible("blocks.1.mlp.router", nn.Linear(64, 16))
    assert not fp8_eligible("blocks.0.attn.c_attn", nn.Linear(40, 120))
    assert not fp8_eligible("blocks.0.mlp.c_proj", nn.Linear(64, 40))
    assert not fp8_eligible("wte", nn.Embedding(128, 64))


def test_torchao_converts_exactly_the_eligible_linears_and_keeps_parameters():
    model = small_gpt()
    params = {id(p) for p in model.parameters()}
    report = apply_fp8(model, TORCHAO, CPU)
    expected = [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    assert report["backend"] == "torchao" and report["converted"] == expected
    assert report["kept"] == ["lm_head: output head: logits stay in the compute dtype"]
    converted = [fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert converted == expected
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight, "tied head untouched"
    assert {id(p) for p in model.parameters()} == params, "Float8Linear reuses the same Parameter objects"


def test_odd_shaped_layers_stay_in_nn_linear():
    model = small_gpt(mlp_ratio=2.125)  # MLP hidden 136: c_fc (64 -> 136) and c_proj (136 -> 64) are odd
    report = apply_fp8(model, TORCHAO, CPU)
    assert report["converted"] == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    assert report["kept"] == ["blocks.0.mlp.c_fc: out_features=136 not a multiple of 16",
                              "blocks.0.mlp.c_proj: in_features=136 not a multiple of 16",
                              "blocks.1.mlp.c_fc: out_features=136 not a multiple of 16",
                              "blocks.1.mlp.c_proj: in_features=136 not a multiple of 16",
                              "lm_head: output head: logits stay in the compute dtype"]
    assert type(model.blocks[0].mlp.c_fc) is nn.Linear and isinstance(model.blocks[0].attn.c_attn, Float8Linear)
    narrow = small_gpt(n_embd=40)  # every block Linear has a 40-wide side
    assert apply_fp8(narrow, TORCHAO, CPU)["converted"] == []


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_layer_is_close_to_fp32_but_quantized(recipe):
    torch.manual_seed(0)
    linear = nn.Linear(64, 256)
    fp8 = nn.Sequential(copy.deepcopy(linear))
    apply_fp8(fp8, Fp8Config("torchao", recipe, emulate=True), CPU)
    x = torch.randn(8, 32, 64, requires_grad=True)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    ref, out = linear(x), fp8(x)
    assert not torch.equal(out, ref)
    # E4M3 keeps 3 mantissa bits: ~3.5% relative error measured for both recipes, ~10x bf16's.
    assert 0.02 < rel(out, ref) < 0.06
    assert rel(linear.to(torch.bfloat16)(x.bfloat16()).float(), ref) < 0.01
    grad_ref = torch.autograd.grad(ref.square().sum(), x)[0]
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    assert 0.01 < rel(grad, grad_ref) < 0.08  # E5M2 output gradient and E4M3 weight


def train_losses(model: GPT, steps: int = 30, lr: float = 5e-3) -> list[float]:
    """AdamW on 'count up mod 16' sequences from random starts: next token = this token + 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        seq = (torch.randint(0, 16, (8, 1), generator=g) + torch.arange(33)) % 16
        _, loss = model(seq[:, :-1], seq[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def fp32_losses():
    return train_losses(small_gpt())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_training_learns_like_fp32(recipe, fp32_losses):
    model = small_gpt()
    apply_fp8(model, fp8(f"DEVICE_CPU=y FP8_TORCHAO=y FP8_RECIPE_{recipe.upper()}=y"), CPU)
    losses = train_losses(model)
    # Measured: 4.872 -> 0.080 (tensorwise), 4.871 -> 0.079 (rowwise); fp32 4.871 -> 0.081.
    assert losses[0] == pytest.approx(fp32_losses[0], abs=0.01)
    assert losses[-1] < 0.05 * losses[0]
    assert abs(losses[-1] - fp32_losses[-1]) < 0.03


def test_emulated_fp8_runs_under_cpu_bf16_autocast():
    model = small_gpt()
    apply_fp8(model, TORCHAO, CPU)
    x = torch.randint(0, 128, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.blocks[0].attn.c_attn.weight.grad.dtype == torch.float32


@pytest.mark.slow
def test_torch_compile_of_emulated_fp8_matches_eager():
    """~10 s with a warm inductor cache, ~60 s cold on 2 busy cores."""
    model = small_gpt(n_embd=32, n_layer=1, vocab_size=64, block_size=16)
    apply_fp8(model, TORCHAO, CPU)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    eager = model(x, y)[1].item()
    _, loss = torch.compile(model)(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(eager, rel=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- devices and packages


def test_fp8_on_cpu_without_emulation_names_capability_and_the_fix():
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9.*FP8_EMULATE"):
        apply_fp8(small_gpt(), fp8("DEVICE_CPU=y FP8_TORCHAO=y FP8_EMULATE=n"), CPU)
    with pytest.raises(RuntimeError, match=r"CONFIG_FP8_TE=y needs .*8\.9.*FP8_NONE"):
        require_fp8_device(CPU, "te")


def test_old_gpu_is_named_with_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError) as e:
        require_fp8_device(torch.device("cuda"), "torchao")
    assert "NVIDIA A100-SXM4-80GB has compute capability 8.0" in str(e.value)
    assert "8.9+" in str(e.value) and "FP8_EMULATE=y" in str(e.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8_device(torch.device("cuda"), "te")  # H100: no error


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(RuntimeError, match=r"pip install transformer-engine\[pytorch\]"):
        apply_fp8(small_gpt(), TE, CPU)
    with pytest.raises(RuntimeError, match=r"pip install transformer-engine\[pytorch\]"):
        fp8_autocast(TE)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(RuntimeError, match="`pip install torchao`"):
        apply_fp8(small_gpt(), TORCHAO, CPU)


def test_autocast_is_a_no_op_without_te(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # importing TE would raise: it must not be
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    model = small_gpt()
    x = torch.randint(0, 128, (2, 32))
    outside = model(x, x)[1]
    for config in (NONE, TORCHAO):
        context = fp8_autocast(config)
        assert isinstance(context, contextlib.nullcontext), config.backend
        with context:
            inside = model(x, x)[1]
        assert torch.equal(inside, outside), "the forward is unchanged inside the context"
    with pytest.raises(RuntimeError, match="pip install transformer-engine"):
        fp8_autocast(TE)  # the same blocked import, reached only for te


def test_te_shape_problems_without_te_installed():
    assert te_shape_problems(small_gpt(vocab_size=100), tokens_per_micro_batch=8 * 32) == []  # head is exempt
    problems = te_shape_problems(small_gpt(mlp_ratio=2.125), tokens_per_micro_batch=4 * 30)
    assert len(problems) == 5
    assert problems[0].startswith("blocks.0.mlp.c_fc: nn.Linear(64, 136): out_features=136 not a multiple of 16")
    assert problems[-1].startswith("120 tokens per micro-batch (micro-batch x sequence length) is not a multiple of 16")
    assert te_token_problem(4 * 32) is None


# --------------------------------------------------------------------------- TransformerEngine wiring
# TE needs CUDA and is not installed here; a stand-in with TE's constructor arguments and parameter
# names (weight, bias, layer_norm_weight, layer_norm_bias) computing in plain torch checks that the
# swap copies every weight and fuses each pre-norm into the right Linear.


class StandInLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((out_features, in_features), float("nan"), dtype=params_dtype,
                                              device=device))
        self.bias = nn.Parameter(torch.full((out_features,), float("nan"), dtype=params_dtype, device=device)) \
            if bias else torch.empty(0)  # TE keeps an empty tensor, not None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias if self.bias.numel() else None)


class StandInLayerNormLinear(StandInLinear):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, normalization="LayerNorm",
                 params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias, params_dtype, device)
        self.eps, self.normalization = eps, normalization
        self.layer_norm_weight = nn.Parameter(torch.full((in_features,), float("nan")))
        self.layer_norm_bias = nn.Parameter(torch.full((in_features,), float("nan"))) \
            if normalization == "LayerNorm" else None

    def forward(self, x):
        shape = (x.size(-1),)
        if self.normalization == "RMSNorm":
            h = F.rms_norm(x, shape, self.layer_norm_weight, self.eps)
        else:
            h = F.layer_norm(x, shape, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return super().forward(h)


@pytest.fixture
def stand_in_te(monkeypatch):
    entered = []

    class Autocast:
        def __init__(self, enabled, recipe):
            entered.append((enabled, recipe))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    recipe = types.SimpleNamespace(
        Format=types.SimpleNamespace(HYBRID="HYBRID"),
        DelayedScaling=lambda fp8_format: ("DelayedScaling", fp8_format),
        Float8CurrentScaling=lambda fp8_format: ("Float8CurrentScaling", fp8_format))
    te = types.SimpleNamespace(Linear=StandInLinear, LayerNormLinear=StandInLayerNormLinear, autocast=Autocast)
    common = types.SimpleNamespace(recipe=recipe)
    package = types.SimpleNamespace(pytorch=te, common=common)
    for name, module in [("transformer_engine", package), ("transformer_engine.pytorch", te),
                         ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(precision, "require_fp8_device", lambda device, backend: None)
    precision._te_recipe.cache_clear()
    yield entered
    precision._te_recipe.cache_clear()


@pytest.mark.parametrize("kw", [{}, {"norm": "rmsnorm", "bias": False}, {"bias": False}])
def test_te_swap_fuses_pre_norms_and_keeps_the_function(stand_in_te, kw):
    model = small_gpt(**kw)
    reference = copy.deepcopy(model)
    report = apply_fp8(model, TE, CPU)
    assert report["converted"] == [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    assert report["fused"] == ["blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2"]
    block = model.blocks[0]
    assert isinstance(block.ln_1, nn.Identity) and isinstance(block.ln_2, nn.Identity)
    assert type(block.attn.c_attn) is StandInLayerNormLinear and type(block.mlp.c_fc) is StandInLayerNormLinear
    assert type(block.attn.c_proj) is StandInLinear and type(block.mlp.c_proj) is StandInLinear
    assert block.attn.c_attn.normalization == ("RMSNorm" if kw.get("norm") == "rmsnorm" else "LayerNorm")
    assert block.attn.c_attn.eps == reference.blocks[0].ln_1.eps
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    x = torch.randint(0, 128, (2, 32))
    torch.testing.assert_close(model(x, x)[1], reference(x, x)[1])


def test_te_odd_linear_is_neither_swapped_nor_fused(stand_in_te):
    model = small_gpt(mlp_ratio=2.125)
    report = apply_fp8(model, TE, CPU)
    assert report["fused"] == ["blocks.0.ln_1", "blocks.1.ln_1"]
    assert type(model.blocks[0].ln_2) is nn.LayerNorm and type(model.blocks[0].mlp.c_fc) is nn.Linear


@pytest.mark.parametrize("current, name", [(False, "DelayedScaling"), (True, "Float8CurrentScaling")])
def test_te_autocast_uses_the_configured_recipe_with_hybrid_format(stand_in_te, current, name):
    with fp8_autocast(fp8("DEVICE_CUDA=y FP8_TE=y" + (" TE_RECIPE_CURRENT=y" if current else ""))):
        pass
    assert stand_in_te == [(True, (name, "HYBRID"))]
