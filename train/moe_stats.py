"""Expert-load bookkeeping for a model's MoE layers: bias balancing per step, load metrics per interval.

Each MoE layer overwrites ``layer.last`` on every forward (model/moe.py). The trainer calls
``collect`` after each training micro-batch's forward, ``end_step`` after the optimizer step
(aux-loss-free balancing moves each layer's expert bias by that step's whole load), and
``metrics`` at logging intervals. Everything stays on the device until ``metrics`` reads it.
"""

from __future__ import annotations

import torch


class MoEStats:
    def __init__(self, layers, device: torch.device):
        self.layers = list(layers)
        self.n_experts = self.layers[0].config.n_experts if self.layers else 0
        shape = (len(self.layers), self.n_experts)
        self.step_load = torch.zeros(shape, device=device)
        self.interval_load = torch.zeros(shape, device=device)
        self.dropped = torch.zeros((), device=device)
        self.assignments = 0

    def __bool__(self) -> bool:
        return bool(self.layers)

    def collect(self) -> None:
        for i, layer in enumerate(self.layers):
            self.step_load[i] += layer.last["load"]
            self.dropped += layer.last["dropped"]
            self.assignments += layer.last["assignments"]

    def end_step(self, balance: bool = True) -> None:
        """After the optimizer step; balance=False (a skipped update) leaves the expert biases alone."""
        for layer, load in zip(self.layers, self.step_load):
            if balance:
                layer.update_bias(load)
        self.interval_load += self.step_load
        self.step_load.zero_()

    def metrics(self) -> dict:
        """Per-layer expert load fractions, the most loaded expert relative to uniform (1.0 = balanced,
        worst layer) and the fraction of assignments dropped by capacity, since the last call."""
        load = self.interval_load / self.interval_load.sum(dim=1, keepdim=True).clamp(min=1)
        out = {
            "moe_load": [[round(x, 4) for x in row] for row in load.tolist()],
            "moe_load_max": float(load.max()) * self.n_experts,
            "moe_dropped_frac": float(self.dropped) / max(1, self.assignments),
        }
        self.interval_load.zero_()
        self.dropped.zero_()
        self.assignments = 0
        return out
