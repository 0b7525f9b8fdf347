"""FP8 training (CONFIG_FP8_*): torchao float8 or NVIDIA TransformerEngine, chosen in Kconfig.

Both backends swap nn.Linear layers of the blocks for FP8 versions; weights, optimizer state,
embeddings, norms, MoE experts (3-D parameters, not Linears) and the output head keep the compute
dtype. A Linear is converted only when both its dims are multiples of 16 (the FP8 GEMM constraint
of cuBLAS/_scaled_mm and of TransformerEngine); the head (``lm_head``, often tied to the embedding)
and MoE routers always stay as they are.

- torchao: ``convert_to_float8_training`` replaces eligible layers by ``Float8Linear``, which casts
  input, weight and output gradient to FP8 with dynamic scales ("tensorwise" or "rowwise" recipe).
  Parameters are the same objects as before. ``emulate=True`` (CONFIG_FP8_EMULATE) quantizes
  exactly as on the GPU but multiplies in higher precision, so it runs on a CPU.
- TransformerEngine: eligible layers become ``te.Linear``; a pre-norm followed by its first Linear
  (Block.ln_1 -> attn.c_attn, Block.ln_2 -> mlp.c_fc) becomes one ``te.LayerNormLinear`` and the
  norm an ``nn.Identity``. FP8 is active only inside ``fp8_autocast(config)`` around the forward.
  New parameters are created, so convert before building the optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn as nn

MIN_CAPABILITY = (8, 9)  # Ada (RTX 40xx, L4, L40) and Hopper (H100, H200) and newer have FP8 tensor cores
FP8_MULTIPLE = 16  # FP8 GEMMs need both matrix dims to be multiples of 16
KEEP = {  # Linears kept in higher precision whatever their shape, by the last part of their name
    "lm_head": "output head: logits stay in the compute dtype",
    "router": "MoE router: routing runs in fp32 (model/moe.py)",
}
TORCHAO_PIP = "pip install torchao"
TE_PIP = "pip install transformer-engine[pytorch]"
PRE_NORMS = (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc"))  # norm -> the Linear it alone feeds
BACKENDS = ("none", "torchao", "te")  # the values of CONFIG_FP8
TORCHAO_RECIPES = ("tensorwise", "rowwise")  # CONFIG_FP8_RECIPE
TE_RECIPES = ("delayed", "current")  # CONFIG_TE_RECIPE


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """The FP8 choice and its backend's options (train/Kconfig.precision); defaults: Kconfig's."""

    backend: str = "none"  # none | torchao | te (CONFIG_FP8)
    recipe: str | None = None  # torchao: tensorwise | rowwise (CONFIG_FP8_RECIPE); None for the others
    emulate: bool = False  # torchao: quantize as on the GPU, multiply in higher precision (CONFIG_FP8_EMULATE)
    te_recipe: str | None = None  # te: delayed | current (CONFIG_TE_RECIPE); None for the others

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {self.backend!r}; expected one of {BACKENDS} (CONFIG_FP8)")
        if self.backend == "torchao" and self.recipe not in TORCHAO_RECIPES:
            raise ValueError(f"torchao FP8 needs a recipe, one of {TORCHAO_RECIPES} (CONFIG_FP8_RECIPE), "
                             f"not {self.recipe!r}")
        if self.backend == "te" and self.te_recipe not in TE_RECIPES:
            raise ValueError(f"TransformerEngine FP8 needs a recipe, one of {TE_RECIPES} (CONFIG_TE_RECIPE), "
                             f"not {self.te_recipe!r}")

    @classmethod
    def from_config(cls, cfg) -> Fp8Config:
        return cls(backend=cfg.FP8, recipe=cfg.FP8_RECIPE, emulate=cfg.FP8_EMULATE, te_recipe=cfg.TE_RECIPE)

    @property
    def needs_fp8_gpu(self) -> bool:
        """Whether training needs a GPU with FP8 tensor cores (not for emulated torchao)."""
        return self.backend == "te" or (self.backend == "torchao" and not self.emulate)


def _kept_reason(fqn: str, module: nn.Module) -> str | None:
    """Why this Linear stays in higher precision, or None when FP8 can take it."""
    name = fqn.rpartition(".")[2]
    if name in KEEP:
        return KEEP[name]
    odd = [f"{dim}={n}" for dim, n in (("in_features", module.in_features), ("out_features", module.out_features))
           if n % FP8_MULTIPLE]
    if odd:
        return f"{', '.join(odd)} not a multiple of {FP8_MULTIPLE}"
    return None


def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """An nn.Linear FP8 can take: both dims multiples of 16 and not the output head."""
    return isinstance(module, nn.Linear) and _kept_reason(fqn, module) is None


def _plan(model: nn.Module) -> tuple[list[str], list[str]]:
    """(fqns to convert, "fqn: reason" for Linears kept), in module order."""
    converted, kept = [], []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = _kept_reason(fqn, module)
            if reason is None:
                converted.append(fqn)
            else:
                kept.append(f"{fqn}: {reason}")
    return converted, kept


def te_shape_problems(model: nn.Module, tokens_per_micro_batch: int | None = None) -> list[str]:
    """What keeps TransformerEngine FP8 from covering the model; works without TE installed.

    Layers with a dim not a multiple of 16 are listed (apply_fp8 leaves them in nn.Linear). The
    token count is a hard limit: TE documents that FP8 Linear inputs need both dims divisible by
    16, i.e. MICRO_BATCH x BLOCK_SIZE a multiple of 16, or the forward fails.
    """
    problems = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear) and fqn.rpartition(".")[2] not in KEEP:
            reason = _kept_reason(fqn, module)
            if reason is not None:
                problems.append(f"{fqn}: nn.Linear({module.in_features}, {module.out_features}): {reason}; "
                                "TransformerEngine's FP8 GEMM needs both dims multiples of 16, so it stays "
                                "in higher precision")
    if tokens_per_micro_batch is not None and te_token_problem(tokens_per_micro_batch):
        problems.append(te_token_problem(tokens_per_micro_batch))
    return problems


def te_token_problem(tokens_per_micro_batch: int) -> str | None:
    """The hard limit of te_shape_problems: rows of every FP8 Linear input a multiple of 16."""
    if tokens_per_micro_batch % FP8_MULTIPLE == 0:
        return None
    return (f"{tokens_per_micro_batch} tokens per micro-batch (micro-batch x sequence length) is not a "
            f"multiple of {FP8_MULTIPLE}: TransformerEngine's FP8 Linear needs the flattened input's "
            "rows to be; change MICRO_BATCH, BLOCK_SIZE or the curriculum stages")


def require_fp8_device(device: torch.device, backend: str) -> None:
    """Raise RuntimeError unless `device` is a CUDA GPU with compute capability 8.9+."""
    option = {"torchao": "CONFIG_FP8_TORCHAO", "te": "CONFIG_FP8_TE"}[backend]
    fix = ("select FP8_EMULATE=y to emulate FP8 (checks, not speed) or FP8_NONE" if backend == "torchao"
           else "select FP8_NONE (or FP8_TORCHAO with FP8_EMULATE=y to check the FP8 path without such a GPU)")
    need = f"an NVIDIA GPU with compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (RTX 40xx, L4, H100, H200)"
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{option}=y needs {need}, but training runs on {device.type} with no CUDA GPU; {fix}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise RuntimeError(f"{option}=y needs {need}, but {torch.cuda.get_device_name(device)} has compute "
                           f"capability {cap[0]}.{cap[1]}; {fix}")


def _import_torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as e:
        raise RuntimeError(f"CONFIG_FP8_TORCHAO=y needs the torchao package: `{TORCHAO_PIP}` ({e})") from None
    return Float8LinearConfig, convert_to_float8_training, Float8Linear


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise RuntimeError(f"CONFIG_FP8_TE=y needs NVIDIA TransformerEngine: `{TE_PIP}` ({e})") from None
    return te


def apply_fp8(model: nn.Module, config: Fp8Config, device: torch.device) -> dict:
    """Convert `model` in place for the configured backend.

    Returns {"backend", "converted": [fqn], "kept": ["fqn: reason"], "fused": [norm fqns folded into a
    te.LayerNormLinear]}. Call on the model already on `device`, before torch.compile and before the
    optimizer is built.
    """
    backend = config.backend
    if backend == "none":
        return {"backend": None, "converted": [], "kept": [], "fused": []}
    converted, kept = _plan(model)
    if backend == "torchao":
        Float8LinearConfig, convert_to_float8_training, Float8Linear = _import_torchao_float8()
        if not config.emulate:
            require_fp8_device(device, "torchao")
        torchao_config = dataclasses.replace(Float8LinearConfig.from_recipe_name(config.recipe),
                                             emulate=config.emulate)
        convert_to_float8_training(model, config=torchao_config,
                                   module_filter_fn=lambda module, fqn: fp8_eligible(fqn, module))
        swapped = [fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)]
        fused = []
    else:
        te = _import_te()
        require_fp8_device(device, "te")
        fused = _swap_te(model, te, converted)
        swapped = [fqn for fqn, m in model.named_modules() if isinstance(m, (te.Linear, te.LayerNormLinear))]
    if swapped != converted:  # the library skipped or added layers: say so rather than train something else
        raise RuntimeError(f"FP8 conversion ({backend}) converted {swapped}, expected {converted}")
    return {"backend": backend, "converted": converted, "kept": kept, "fused": fused}


def _copy_param(dst: torch.Tensor | None, src: torch.Tensor | None, fill: float) -> None:
    """Copy src into dst; where the source module has no such parameter, fill and freeze dst."""
    if dst is None:
        return
    with torch.no_grad():
        if src is None:
            dst.fill_(fill)
            dst.requires_grad_(False)
        else:
            dst.copy_(src)


def _te_linear(te, linear: nn.Linear) -> nn.Module:
    new = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    params_dtype=linear.weight.dtype, device=linear.weight.device)
    _copy_param(new.weight, linear.weight, 0.0)
    _copy_param(new.bias if linear.bias is not None else None, linear.bias, 0.0)
    return new


def _te_norm_linear(te, norm: nn.Module, linear: nn.Linear) -> nn.Module:
    rms = isinstance(norm, nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(linear.weight.dtype).eps  # nn.RMSNorm's default
    new = te.LayerNormLinear(linear.in_features, linear.out_features, eps=eps, bias=linear.bias is not None,
                             normalization="RMSNorm" if rms else "LayerNorm",
                             params_dtype=linear.weight.dtype, device=linear.weight.device)
    _copy_param(new.weight, linear.weight, 0.0)
    _copy_param(new.bias if linear.bias is not None else None, linear.bias, 0.0)
    _copy_param(new.layer_norm_weight, norm.weight, 1.0)
    if not rms:
        _copy_param(new.layer_norm_bias, norm.bias, 0.0)  # a bias-free LayerNorm keeps a frozen zero bias
    return new


def _swap_te(model: nn.Module, te, eligible: list[str]) -> list[str]:
    """Replace the eligible Linears by TE modules, fusing pre-norms; returns the fused norms' fqns."""
    todo, fused = set(eligible), []
    for fqn, block in list(model.named_modules()):
        for norm_name, linear_path in PRE_NORMS:
            norm = getattr(block, norm_name, None)
            linear_fqn = f"{fqn}.{linear_path}" if fqn else linear_path
            if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) or linear_fqn not in todo:
                continue
            _set(model, linear_fqn, _te_norm_linear(te, norm, model.get_submodule(linear_fqn)))
            setattr(block, norm_name, nn.Identity())
            todo.discard(linear_fqn)
            fused.append(f"{fqn}.{norm_name}" if fqn else norm_name)
    for fqn in eligible:
        if fqn in todo:
            _set(model, fqn, _te_linear(te, model.get_submodule(fqn)))
    return fused


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@functools.cache
def _te_recipe(current: bool):
    """One recipe object per kind, reused across steps (TE keys its amax buffers by recipe)."""
    from transformer_engine.common import recipe

    if current:
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID)


def fp8_autocast(config: Fp8Config) -> contextlib.AbstractContextManager:
    """The context for the forward pass: TE's FP8 autocast for the te backend, else a no-op.

    Wrap the forward only (loss included is fine); call backward outside it.
    """
    if config.backend != "te":
        return contextlib.nullcontext()
    te = _import_te()
    recipe = _te_recipe(config.te_recipe == "current")
    if hasattr(te, "autocast"):  # TE 2.x; fp8_autocast is its deprecated alias
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
