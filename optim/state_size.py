"""How much memory each optimizer (CONFIG_OPTIMIZER) keeps and allocates, for train/memory.py.

State is counted in fp32 tensors per parameter, split by the parameter groups optim/optimizers.py
builds: Muon keeps one momentum buffer for the hidden matrices and AdamW's two moments for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from kconfig.errors import NamedError


@dataclass(frozen=True)
class StateSize:
    matrices: int  # fp32 state tensors per parameter of a hidden matrix (Muon's share)
    others: int  # fp32 state tensors per other parameter (embeddings, norms, biases)
    newton_schulz: bool = False  # the step orthogonalizes each matrix: temporaries for the largest


STATE_SIZES = {
    "adamw": StateSize(matrices=2, others=2),  # exp_avg, exp_avg_sq
    "lion": StateSize(matrices=1, others=1),  # exp_avg
    "muon": StateSize(matrices=1, others=2, newton_schulz=True),  # momentum; AdamW for the rest
    "sgd": StateSize(matrices=1, others=1),  # momentum_buffer
}


class UnknownOptimizer(NamedError, ValueError):
    """An optimizer name with no STATE_SIZES entry."""


def state_size(optimizer: str) -> StateSize:
    """The entry for a CONFIG_OPTIMIZER value; UnknownOptimizer names the known ones."""
    try:
        return STATE_SIZES[optimizer]
    except KeyError:
        raise UnknownOptimizer(f"unknown optimizer {optimizer!r} (CONFIG_OPTIMIZER); the memory predictor knows "
                               f"{sorted(STATE_SIZES)}: add its state to optim/state_size.py STATE_SIZES") from None


def newton_schulz_bytes(shapes: list[tuple[int, int, int]]) -> int:
    """Bytes Muon's step allocates for its largest (stack, rows, cols) matrix while grads are alive.

    optim/muon.py's Newton-Schulz in fp32 (its CPU default) writes the Nesterov update into its
    stack and normalizes it there, so it holds X and the next X (two copies of the matrix) and the
    Gram matrix X X^T with its polynomial (two b x s x s, s the smaller side). On CPU a stack
    holds at most 2^17 elements (0.5 MiB) or one parameter, so the largest parameter sets the
    peak. torch.optim.Muon and CUDA's bf16 iteration hold a little less; this is the fp32 count.
    """
    return max(2 * b * r * k * 4 + 2 * b * min(r, k) ** 2 * 4 for b, r, k in shapes)
