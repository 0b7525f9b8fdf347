"""The CPU dry run: every planned run builds, takes two optimizer steps, and gets gradients.

No dataset, network or GPU is needed: tokens are random, the vocabulary is
the tokenizer's upper bound, and models too large for a CPU budget are
checked as a reduced-depth/width twin that keeps every option of the config.
"""

from __future__ import annotations

import dataclasses

import torch

from kbuild.kconfig import Config
from model.gpt import GPT, ModelConfig
from optim.optimizers import build_optimizer
from optim.schedule import lr_at

CPU_PARAM_BUDGET = 30_000_000  # larger models are checked as a reduced twin
CHECK_VOCAB = 256  # byte vocabulary; char vocabularies of the shipped corpora are smaller


def check_config(cfg: Config) -> dict:
    """Build the run's model (or its twin), take two steps; raise with a reason if anything is off."""
    mcfg = ModelConfig.from_config(cfg, CHECK_VOCAB)
    full_params = _param_count(mcfg)
    twin = full_params > CPU_PARAM_BUDGET
    if twin:
        head_dim = 16
        mcfg = dataclasses.replace(mcfg, n_layer=min(mcfg.n_layer, 2), n_embd=head_dim * mcfg.n_head,
                                   block_size=min(mcfg.block_size, 64))
    torch.manual_seed(cfg.SEED)
    model = GPT(mcfg)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    batch, seq = min(cfg.MICRO_BATCH, 4), min(mcfg.block_size, 64)
    losses = []
    for step in range(2):  # the second step runs on optimizer state made by the first
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = torch.randint(0, mcfg.vocab_size, (batch, seq))
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: loss is {loss.item()}")
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise RuntimeError(f"step {step + 1}: no gradient reached {', '.join(missing[:5])}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"params": full_params, "twin": twin, "losses": losses}


def _param_count(mcfg: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(mcfg).num_params(non_embedding=False)
