"""What a checkpoint holds beyond weights: RNG states, and the check that it fits this config."""

from __future__ import annotations

import random

import numpy as np
import torch

from kconfig.tree import new_kconfig
from kconfig.values import values

MODEL_KCONFIG = "model/Kconfig"


def capture_rng() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain containers
    (so the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_symbols() -> set[str]:
    """Symbols of the Model menu: a checkpoint's weights only fit a config that agrees on all of them."""
    return {s.name for s in new_kconfig().unique_defined_syms if s.nodes[0].filename.startswith(MODEL_KCONFIG)}


def _defaults() -> dict:
    return values(new_kconfig())


def te_layers(saved: dict) -> bool:
    """Whether a run's weights live in TransformerEngine layers (CONFIG_FP8 "te"), whose parameter names
    differ from the plain model's; torchao's FP8 keeps the names. ``saved``: a checkpoint's config, which
    before choices carried their value (the kconfig package) held only the option symbol FP8_TE."""
    return saved["FP8"] == "te" if "FP8" in saved else saved["FP8_TE"]


def incompatibilities(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's config and this one such that its weights cannot load: a
    Model menu symbol, or FP8 into or out of TransformerEngine's layers."""
    problems = []
    defaults = None
    for name in sorted(model_symbols()):
        if name in saved:
            was = saved[name]
        else:  # a symbol added since the checkpoint was written: it had the value a tree without it means
            defaults = defaults or _defaults()
            was = defaults[name]
        if was != current[name]:
            problems.append(f"CONFIG_{name}: checkpoint {was!r}{'' if name in saved else ' (its default: the checkpoint predates it)'}, "
                            f"configuration {current[name]!r}")
    if te_layers(saved) != te_layers(current):
        side = "checkpoint" if te_layers(saved) else "configuration"
        problems.append(f"CONFIG_FP8: only the {side} uses TransformerEngine's layers (FP8 \"te\"), which "
                        f"store the weights under other names")
    return problems


def shape_mismatches(saved: dict, current: dict) -> list[str]:
    """Tensors of a state dict ``saved`` that do not fit the model's ``current`` one: a different shape,
    missing from the checkpoint, or absent from the model. Empty when the weights load as they are."""
    problems = [f"{name}: checkpoint {tuple(saved[name].shape)}, model {tuple(tensor.shape)}"
                for name, tensor in current.items() if name in saved and saved[name].shape != tensor.shape]
    problems += [f"{name}: not in the checkpoint" for name in current if name not in saved]
    problems += [f"{name}: not in the model" for name in saved if name not in current]
    return problems
