"""The DPO family's losses on preference pairs, and the numbers a DPO run logs.

For a pair (prompt, chosen y_w, rejected y_l), with the log-probabilities of each response under
the policy (pi) and the frozen reference (ref) summed over the response tokens:

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))     the pair's log-ratio margin

    sigmoid (DPO, Rafailov et al. 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        (eps = DPO_LABEL_SMOOTHING: conservative DPO, eps of the labels assumed flipped)
    ipo (Azar et al. 2023):               (h - 1 / (2 beta))^2

The implicit rewards are beta times each response's log-ratio; preference accuracy is the share of
pairs whose chosen reward exceeds the rejected one. The KL logged is the exact per-token
KL(pi || ref) of the next-token distributions, averaged over the response positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # target of a position without loss (prompt, padding), as F.cross_entropy's ignore_index


@dataclass(frozen=True)
class DPOConfig:
    """DPO_LOSS, DPO_BETA, DPO_LABEL_SMOOTHING; the defaults are Kconfig's."""

    loss: str = "sigmoid"  # or "ipo"
    beta: float = 0.1
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> DPOConfig:
        smoothing = cfg.DPO_LABEL_SMOOTHING if cfg.DPO_LOSS == "sigmoid" else 0.0
        return cls(loss=cfg.DPO_LOSS, beta=cfg.DPO_BETA, label_smoothing=smoothing)


def sequence_logps(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(target) over each row's positions whose target is not IGNORE; ``logp`` (B, T, V) are
    log-probabilities (log_softmax of the logits, computed once for this and token_kl)."""
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def token_kl(logp: torch.Tensor, logq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over response positions (targets not IGNORE) of KL(pi || ref) between next-token distributions,
    from the policy's and the reference's log-probabilities."""
    kl = (logp.exp() * (logp - logq)).sum(-1)
    keep = targets != IGNORE
    return (kl * keep).sum() / keep.sum().clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, config: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, detached metrics: chosen and rejected rewards, margin, accuracy)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if config.loss == "ipo":
        losses = (h - 1 / (2 * config.beta)) ** 2
    elif config.loss == "sigmoid":
        eps = config.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(config.beta * h) - eps * F.logsigmoid(-config.beta * h)
    else:
        raise ValueError(f"CONFIG_DPO_LOSS={config.loss!r}: not a DPO loss (sigmoid, ipo)")
    chosen_reward, rejected_reward = config.beta * chosen_ratio.detach(), config.beta * rejected_ratio.detach()
    metrics = {"dpo_chosen_reward": chosen_reward.mean(), "dpo_rejected_reward": rejected_reward.mean(),
               "dpo_reward_margin": (chosen_reward - rejected_reward).mean(),
               "dpo_accuracy": (chosen_reward > rejected_reward).float().mean()}
    return losses.mean(), metrics
