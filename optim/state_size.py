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


def newton_schulz_bytes(shapes: list[tuple[int, int, int, int]], stack_elements: int = 1 << 22) -> int:
    """Bytes Muon's step allocates for its largest stack while grads are alive; ``shapes``: (parameters,
    matrices per parameter, rows, cols) per kind of matrix, ``stack_elements``: optim/muon.py's limit.

    optim/muon.py stacks same-shape matrices (a tall one with the wide ones of its transposed shape) up
    to ``stack_elements`` elements, or one parameter if that is larger, and runs Newton-Schulz once per
    stack, one stack at a time. In fp32 (its CPU default) it writes the Nesterov update into its stack and
    normalizes it there, so a stack of b matrices of s x l (s the smaller side) holds X and the next X (two
    copies) and the Gram matrix X X^T with its polynomial (two b x s x s). torch.optim.Muon and bf16
    iterations hold less; this is the fp32 count. The packing follows muon.batches: parameters in order,
    a stack closed when the next one would pass the limit.
    """
    stacks: dict[tuple[int, int], list[int]] = {}  # (s, l) -> the matrices of each stack, in order
    for params, per_param, rows, cols in shapes:
        key = (min(rows, cols), max(rows, cols))
        counts = stacks.setdefault(key, [])
        for _ in range(params):
            if counts and (counts[-1] + per_param) * key[0] * key[1] <= stack_elements:
                counts[-1] += per_param
            else:
                counts.append(per_param)
    return max((2 * b * s * l * 4 + 2 * b * s * s * 4 for (s, l), counts in stacks.items() for b in counts),
               default=0)
