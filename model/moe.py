"""Mixture-of-Experts feed-forward layer (CONFIG_MOE): a drop-in for the dense MLP of a block.

Routing. A bias-free router ``nn.Linear(n_embd, n_experts)`` runs in fp32 (autocast off, input
upcast) and gives logits ``l``. Scores are ``softmax(l)`` over experts (Switch, Mixtral) or an
independent ``sigmoid(l)`` per expert (DeepSeek-V3). Each token picks the ``top_k`` experts by
``score + expert_bias``; the bias (a persistent buffer moved by ``update_bias``, DeepSeek-V3's
auxiliary-loss-free balancing) steers selection only. Gate weights come from the raw scores of the
chosen experts, renormalized to sum to 1 when ``top_k > 1`` (Mixtral for softmax, DeepSeek-V3 for
sigmoid). With ``top_k == 1`` the gate is the raw score itself (Switch), for both score functions,
so the router still gets a gradient from the language-model loss.

Losses (unweighted, in ``last``; the caller multiplies by the coefficients and adds them):
the Switch load-balancing loss ``E * sum_i f_i * P_i`` (f_i: fraction of the tokens * top_k
assignments routed to expert i before capacity dropping; P_i: mean router probability of expert i,
for sigmoid the scores normalized per token to sum to 1), exactly 1.0 at perfect balance; and the
ST-MoE z-loss ``mean(logsumexp(l)^2)``.

Experts. Routed experts are stored as 3-D parameters ``w_in`` (E, C, fan_out) and ``w_out``
(E, H, C), fan_out = 2H for a gated activation (gate | up fused, as in model/mlp.py's MLP), and
apply model/mlp.py's activation. Experts have no biases. Shared experts (``n_shared`` > 0) are one
bias-free model/mlp.py MLP of width n_shared * H that every token passes through.

Dispatch (no loop over tokens). The (token, expert) assignments are flattened token-major, stably
sorted by expert, so every expert's tokens form a contiguous slice in token order; with a capacity,
the part of each slice past ``capacity`` is dropped (later tokens first) and contributes nothing,
leaving the token to the caller's residual connection. Tokens are gathered, pushed through
``expert_matmul`` (``torch._grouped_mm`` where ``grouped_mm_usable`` says it works, else a loop over
experts on contiguous slices), weighted by their gates and summed back with ``index_add_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.mlp import MLP, activation, fan_out

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    n_shared: int = 0  # shared experts, always active, each as wide as a routed expert
    expert_hidden: int = 0  # hidden width of one expert (the caller sets it; must be > 0)
    score: str = "softmax"  # softmax | sigmoid router scores
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient; 0 = off
    z_loss_coef: float = 0.0  # router z-loss coefficient; 0 = off
    bias_rate: float = 0.0  # gamma of aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: float = 0.0  # 0 = dropless; else capacity = ceil(factor * tokens * top_k / n_experts)
    jitter: float = 0.0  # router input jitter eps (uniform noise in [1-eps, 1+eps]), training only

    def __post_init__(self):
        problems = []
        if self.n_experts < 1:
            problems.append(f"CONFIG_MOE_EXPERTS={self.n_experts} must be >= 1")
        if not 1 <= self.top_k <= max(self.n_experts, 1):
            problems.append(f"CONFIG_MOE_TOP_K={self.top_k} must be within [1, CONFIG_MOE_EXPERTS={self.n_experts}]")
        if self.n_shared < 0:
            problems.append(f"CONFIG_MOE_SHARED_EXPERTS={self.n_shared} must be >= 0")
        if self.expert_hidden <= 0:
            problems.append(f"expert_hidden={self.expert_hidden} must be > 0; derive it from CONFIG_MOE_EXPERT_RATIO"
                            " and CONFIG_N_EMBD with model.mlp.hidden_width")
        if self.score not in SCORES:
            problems.append(f"unknown router score {self.score!r}; expected one of {SCORES}"
                            " (CONFIG_MOE_SCORE: softmax or sigmoid)")
        for name, value in (("AUX_LOSS_COEF", self.aux_loss_coef), ("Z_LOSS_COEF", self.z_loss_coef),
                            ("BIAS_RATE", self.bias_rate), ("CAPACITY_FACTOR", self.capacity_factor)):
            if value < 0:
                problems.append(f"CONFIG_MOE_{name}={value} must be >= 0")
        if not 0 <= self.jitter < 1:
            problems.append(f"CONFIG_MOE_JITTER={self.jitter} must be within [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg, expert_hidden: int) -> MoEConfig:
        """Build from resolved Kconfig values (kconfig.tree.Config); needs CONFIG_MOE=y."""
        if not cfg.MOE:
            raise ValueError("MoEConfig.from_config needs CONFIG_MOE=y; with it off, blocks keep the dense MLP")
        return cls(
            n_experts=cfg.MOE_EXPERTS,
            top_k=cfg.MOE_TOP_K,
            n_shared=cfg.MOE_SHARED_EXPERTS,
            expert_hidden=expert_hidden,
            score=cfg.MOE_SCORE,
            aux_loss_coef=cfg.MOE_AUX_LOSS_COEF,
            z_loss_coef=cfg.MOE_Z_LOSS_COEF,
            bias_rate=cfg.MOE_BIAS_RATE,
            capacity_factor=cfg.MOE_CAPACITY_FACTOR,
            jitter=cfg.MOE_JITTER,
        )


def is_moe_block(index: int, every: int, first_dense: int) -> bool:
    """Whether block ``index`` (from 0) is MoE under CONFIG_MOE_EVERY and CONFIG_MOE_FIRST_DENSE."""
    return index >= first_dense and (index - first_dense) % every == 0


def saved_bytes(moe: MoEConfig, mlp: str, tokens: int, n_embd: int, act_bytes: int) -> int:
    """Bytes an MoE layer keeps for backward over ``tokens`` (train/memory.py; replaces the dense
    MLP's): fp32 router terms, indices, the gathered rows and the experts' activations.

    Assignments: tokens * top_k, or with a capacity at most n_experts * capacity (the tokens dropped
    depend on the data and are not subtracted, so this is an upper bound).
    """
    E, k, He, N, C, a, f = moe.n_experts, moe.top_k, moe.expert_hidden, tokens, n_embd, act_bytes, 4
    act = activation(mlp)
    Nk = N * k
    if moe.capacity_factor:
        Nk = min(Nk, E * math.ceil(moe.capacity_factor * N * k / E))
    saved = N * C * f  # the router's input: ln_2's fp32 output (the router runs in fp32)
    saved += N * E * f  # softmax / sigmoid scores, fp32
    saved += N * k * 8 + N * k * f + N * f  # top-k indices (gather's index), the gates, their sum
    saved += 2 * Nk * 8  # sort order (index of the gates' gather) and token ids (index of x's gather, index_add_)
    saved += Nk * a  # the gates gathered per assignment, in the compute dtype
    saved += 3 * Nk * C * a  # gathered inputs, the w_out product and its gated copy (index_add_'s source)
    saved += act.saved_bytes(Nk, He, a)  # the experts' hidden activations
    if moe.n_shared:  # one dense MLP over all tokens: its input copy under autocast, its activations
        saved += (N * C * a if a != f else 0) + act.saved_bytes(N, moe.n_shared * He, a)
    if moe.z_loss_coef:
        saved += N * E * f + N * f  # logsumexp's input (the logits) and output
    if moe.score == "sigmoid" and moe.aux_loss_coef:
        saved += N * f  # the per-token sum normalizing the scores for the balance loss
    return saved


def backward_bytes(moe: MoEConfig, mlp: str, tokens: int, n_embd: int, act_bytes: int) -> int:
    """What an MoE layer's backward adds at its peak: w_out's fp32 grad and the activation's
    gradient temporaries over the tokens * top_k assignments."""
    He = moe.expert_hidden
    return moe.n_experts * He * n_embd * 4 + activation(mlp).backward_temp_bytes(tokens * moe.top_k, He, act_bytes)


def grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can multiply a (M, K) by b (G, K, N) here.

    CUDA: bf16 on compute capability 9.0+ (H100). CPU: fp32/bf16/fp16 when it exists (torch 2.9+).
    Both read rows with 16-byte loads, so base pointers and row strides must be 16-byte aligned
    (C, H and fan_out multiples of 4 in fp32, of 8 in bf16); misaligned shapes raise on CPU and
    can be silently wrong on CUDA, hence the check.
    """
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype or a.device != b.device:
        return False
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return False  # its compile-time (meta) kernel accepts bf16 only
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (9, 0):
            return False
    elif a.device.type != "cpu" or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in (a, b))


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows of x (M, K), sorted by expert with counts[e] rows for expert e (sum = M), times w[e] (K, N).

    grouped: one ``torch._grouped_mm`` call; else a loop over experts (not tokens) on contiguous
    slices, which needs the counts on the host (a device sync on GPUs).
    """
    if grouped:
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out.append(x[start:start + n] @ w[e])
            start += n
    return torch.cat(out) if out else x.new_zeros(0, w.size(-1))


class MoE(nn.Module):
    """Routed (and optionally shared) experts replacing a block's MLP: (B, T, C) -> (B, T, C).

    Every forward overwrites ``self.last`` with the router's statistics: ``aux_loss`` and ``z_loss``
    (unweighted scalars, with grad when their coefficient is > 0, detached otherwise), ``load``
    (float32 (E,), assignments per expert before capacity dropping), ``dropped`` (float32 scalar,
    assignments dropped by capacity) and ``assignments`` (int, tokens * top_k).
    ``use_grouped_mm`` = None picks the dispatch path per call; True/False force it (tests).
    """

    def __init__(self, n_embd: int, mlp: str, moe: MoEConfig, dropout: float = 0.0):
        super().__init__()
        self.config = moe
        self.kind = mlp
        self.activation = activation(mlp)
        E, H = moe.n_experts, moe.expert_hidden
        self.router = nn.Linear(n_embd, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, n_embd, fan_out(H, mlp)))
        self.w_out = nn.Parameter(torch.empty(E, H, n_embd))
        self.w_out.residual_scaled = True
        self.shared = MLP(n_embd, moe.n_shared * H, mlp, bias=False) if moe.n_shared else None
        self.register_buffer("expert_bias", torch.zeros(E))  # persistent: resuming keeps the balance
        self.dropout = nn.Dropout(dropout)
        self.use_grouped_mm: bool | None = None
        self.last: dict = {}
        self.reset_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Normal init: router and input-side weights with std, output projections with residual_std."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.w_in, mean=0.0, std=std)
        nn.init.normal_(self.w_out, mean=0.0, std=residual_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.c_fc.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared.c_proj.weight, mean=0.0, std=residual_std)
        self.expert_bias.zero_()

    def inactive_params(self) -> int:
        """Parameters of the (n_experts - top_k) routed experts a token does not use."""
        per_expert = self.w_in[0].numel() + self.w_out[0].numel()
        return (self.config.n_experts - self.config.top_k) * per_expert

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: expert_bias += bias_rate * sign(mean(load) - load).

        Call once per optimizer step with the load summed over micro-batches (and ranks).
        """
        if self.config.bias_rate:
            load = load.to(self.expert_bias)
            self.expert_bias += self.config.bias_rate * torch.sign(load.mean() - load)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, E) fp32 logits, autocast off; multiplicative jitter on the input in training."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and self.config.jitter:
                eps = self.config.jitter
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            return F.linear(x, self.router.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        B, T, C = x.shape
        E, k = config.n_experts, config.top_k
        x = x.reshape(B * T, C)
        N = x.size(0)

        logits = self.router_logits(x)
        scores = logits.softmax(dim=-1) if config.score == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores.detach() + self.expert_bias, k, dim=-1).indices  # (N, k); bias: selection only
        gates = scores.gather(1, chosen)
        if k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        # Assignment a = token * k + j. A stable sort by expert keeps each expert's tokens in token order.
        experts = chosen.flatten()
        order = torch.argsort(experts, stable=True)
        sorted_experts = experts[order]
        starts = torch.searchsorted(sorted_experts, torch.arange(E + 1, device=x.device))
        counts = starts.diff()
        load = counts.float()
        dropped = torch.zeros((), device=x.device)
        if config.capacity_factor:
            capacity = math.ceil(config.capacity_factor * N * k / E)
            rank = torch.arange(N * k, device=x.device) - starts[sorted_experts]  # position within its expert
            order = order[rank < capacity]
            counts = counts.clamp(max=capacity)
            dropped = N * k - counts.sum().float()
        token = order.div(k, rounding_mode="floor")

        # Autocast does not reach torch._grouped_mm, so cast to the compute dtype by hand.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        xs = x.to(dtype)[token]
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        h = self.activation(expert_matmul(xs, w_in, counts, self._grouped(xs, w_in)))
        y = expert_matmul(h, w_out, counts, self._grouped(h, w_out))
        y = y * gates.flatten()[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros(N, C, dtype=y.dtype, device=x.device).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)

        self.last = self._statistics(logits, scores, load, dropped, N * k)
        return self.dropout(out).view(B, T, C)

    def _grouped(self, a: torch.Tensor, w: torch.Tensor) -> bool:
        return grouped_mm_usable(a, w) if self.use_grouped_mm is None else self.use_grouped_mm

    def _statistics(self, logits, scores, load, dropped, assignments: int) -> dict:
        config = self.config
        probs = scores if config.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        aux = config.n_experts * (load / assignments * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return {
            "aux_loss": aux if config.aux_loss_coef else aux.detach(),
            "z_loss": z if config.z_loss_coef else z.detach(),
            "load": load.detach(),
            "dropped": dropped.detach(),
            "assignments": assignments,
        }
