"""Shared fixtures: configurations built through the real Kconfig tree, a temporary copy of the
repository and a 'make' runner for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", ".cache", "__pycache__", ".pytest_cache",
                                 ".config", "config.py", "defconfig", "build", "*.egg-info")


def config_of(*sets: str, **symbols):
    """A resolved, typed Config: Kconfig defaults, then each SET-syntax text, then ``symbols``.

    The one way tests build configurations: through kconfiglib, strictly (an assignment that does
    not take raises ConfigError), so a test never holds a value the tool would refuse or a symbol
    that no longer exists. ``config_of("MLP_SWIGLU=y", N_LAYER=2, SAMPLE_PROMPT="def ")``.
    """
    from kconfig.tree import parse_overrides, resolve
    from kconfig.values import values

    def word(name, value):
        if isinstance(value, bool):
            return f"{name}={'y' if value else 'n'}"
        return f'{name}="{value}"' if isinstance(value, str) else f"{name}={value!r}"

    layers = [parse_overrides(text) for text in sets]
    layers.append(parse_overrides(" ".join(word(k, v) for k, v in symbols.items())))
    kconf, _ = resolve(*layers)
    return values(kconf)


@pytest.fixture
def config():
    """``config("OPT_LION=y", LR=1e-3)``: see config_of."""
    return config_of


@pytest.fixture
def repo(tmp_path) -> Path:
    """A fresh copy of the source tree, as a new user's clone would be (no .config, no runs)."""
    dest = tmp_path / "repo"
    shutil.copytree(ROOT, dest, ignore=_IGNORE)
    # Prepared data is keyed by content, so sharing the cache only skips repeated tokenizing.
    (dest / ".cache").mkdir()
    shared = ROOT / ".cache" / "data"
    shared.mkdir(parents=True, exist_ok=True)
    (dest / ".cache" / "data").symlink_to(shared)
    return dest


def run_make(repo: Path, *args: str, env: dict | None = None, check: bool = True,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Run make in ``repo`` with this interpreter (no venv creation), capturing output."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("SET", None) if env is None or "SET" not in env else None
    cmd = ["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}", *args]
    p = subprocess.run(cmd, cwd=repo, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def make(repo):
    return lambda *args, **kw: run_make(repo, *args, **kw)


def merged_lora_weights(model) -> dict:
    """A LoRA model's plain state dict with each adapter added in through peft's own delta (W + scale B A),
    fp32: an oracle independent of train/lora.py's checkpoint merge, which the tests compare with it."""
    import torch

    from train.lora import ADAPTER, lora_layers

    merged = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" not in key:
            tensor = tensor.detach()
            merged[key.replace(".base_layer.", ".")] = tensor.float() if tensor.is_floating_point() else tensor
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            merged[f"{name}.weight"] = layer.base_layer.weight.float() + layer.get_delta_weight(ADAPTER).float()
    return merged


def trainable(model) -> list:
    """The parameters an optimizer trains: those that require grad (LoRA's adapters and what trains in full)."""
    return [p for p in model.parameters() if p.requires_grad]

