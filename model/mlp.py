"""The feed-forward MLP of a block and the registry of its activations (CONFIG_MLP).

One ``MLP`` module serves dense blocks (bias and dropout as configured) and MoE shared experts
(bias-free, no dropout of their own); MoE's routed experts apply the same ``Activation`` to their
stacked weights (model/moe.py). A gated activation (SwiGLU, GEGLU) has two input matrices, gate
and up, fused into one ``c_fc`` of twice the hidden width and split in half (gate first); the
others have one. ``hidden_width`` and ``fan_out`` are the one place those rules live.

A new activation is one ``ACTIVATIONS`` entry (its name is the CONFIG_MLP choice value: option
MLP_<NAME>). Its memory factors are what train/memory.py's predictor needs; an entry without them
still trains, and the predictor names the missing factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kconfig.errors import NamedError


class UnknownActivation(NamedError, ValueError):
    """An MLP activation name with no ACTIVATIONS entry."""


class MissingMemoryFactors(NamedError, ValueError):
    """An activation whose memory factors are unknown, so no peak memory can be predicted."""


@dataclass(frozen=True)
class Activation:
    """The nonlinearity between c_fc and c_proj; gated: fn(gate) * up over c_fc's two halves.

    Memory factors, in (rows x hidden) tensors of the matmul dtype, measured on CPU (None: unknown):
    ``saved``: what the MLP keeps for backward from c_fc's output to c_proj's input inclusive;
    ``backward_temps``: gradient temporaries alive in the MLP's backward besides c_proj's input.
    """

    name: str
    gated: bool
    fn: Callable[[torch.Tensor], torch.Tensor]
    saved: int | None = None
    backward_temps: int | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate) * up
        return self.fn(h)

    def saved_bytes(self, rows: int, hidden: int, act_bytes: int) -> int:
        """Bytes the MLP keeps for backward over ``rows`` tokens at hidden width ``hidden``."""
        self._require_memory_factors()
        return self.saved * rows * hidden * act_bytes

    def backward_temp_bytes(self, rows: int, hidden: int, act_bytes: int) -> int:
        """Bytes of the gradient temporaries of the MLP's backward."""
        self._require_memory_factors()
        return self.backward_temps * rows * hidden * act_bytes

    def _require_memory_factors(self) -> None:
        missing = [name for name in ("saved", "backward_temps") if getattr(self, name) is None]
        if missing:
            raise MissingMemoryFactors(
                f"CONFIG_MLP={self.name!r}: the memory predictor has no {' or '.join(map(repr, missing))} factor"
                f" for this activation; measure it (tests/test_memory.py) and set it in model/mlp.py ACTIVATIONS")


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


# gelu/relu2 keep the activation's input and output; gated ones gate|up, fn(gate) and the product.
# Backward temporaries: gelu's grad; pow-backward's three; the grads of fn(gate) and of up.
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("gelu", gated=False, fn=F.gelu, saved=2, backward_temps=1),  # exact (erf) GELU, GPT-2
    Activation("swiglu", gated=True, fn=F.silu, saved=4, backward_temps=2),  # LLaMA
    Activation("relu2", gated=False, fn=relu_squared, saved=2, backward_temps=3),  # Primer
    Activation("geglu", gated=True, fn=gelu_tanh, saved=4, backward_temps=2),  # T5 v1.1, Gemma: tanh GELU
)}


def activation(name: str) -> Activation:
    """The registry entry for a CONFIG_MLP value; UnknownActivation names the choices."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnknownActivation(f"unknown MLP activation {name!r} (CONFIG_MLP); expected one of "
                                f"{sorted(ACTIVATIONS)}, or add it to model/mlp.py ACTIVATIONS") from None


def hidden_width(n_embd: int, ratio: float, name: str) -> int:
    """ratio * n_embd; a gated MLP has three matrices, so 2/3 of it rounded up to a multiple of 64
    keeps its parameter count that of a two-matrix MLP (the dense MLP and every expert)."""
    hidden = int(ratio * n_embd)
    if activation(name).gated:
        hidden = 64 * math.ceil(2 * hidden / 3 / 64)
    return hidden


def fan_out(hidden: int, name: str) -> int:
    """Output width of the input matrix: gate and up fused (2 * hidden) when gated, else hidden."""
    return 2 * hidden if activation(name).gated else hidden


class MLP(nn.Module):
    """c_fc -> activation -> c_proj (marked residual_scaled for GPT's init) -> dropout."""

    def __init__(self, n_embd: int, hidden: int, name: str, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.kind = name
        self.activation = activation(name)
        self.c_fc = nn.Linear(n_embd, fan_out(hidden, name), bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))
