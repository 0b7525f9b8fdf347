"""One GPT module composing the Model menu's options.

With the GPT-2 options (LayerNorm, learned positions, GELU, bias, tied
embeddings) this is nanoGPT's architecture: pre-norm blocks, init std 0.02
with residual projections scaled by 1/sqrt(2 * n_layer). The LLaMA options
(RMSNorm, RoPE, SwiGLU, grouped-query attention) and QK-norm slot into the
same blocks. Attention kernels, sliding windows and soft-capping live in model/attention.py;
the MLP and its activations in model/mlp.py; Mixture-of-Experts layers in model/moe.py.
Optional extra heads predict tokens t+2..t+n (multi-token prediction) and activation
checkpointing (ModelConfig.checkpoint_every) recomputes chosen blocks in backward.
Packed fine-tuning examples pass document ids (GPT.forward's ``doc``): attention stays within each
example and positions restart at 0 at each, so a packed example computes what it computes alone.
Generation (GPT.generate) decodes incrementally through a KV cache (model/attention.py's KVCache)
and samples with temperature, top-k and top-p (sample_next).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.attention import (BACKENDS, CausalSelfAttention, KVCache, LayerCache, causal_mask, document_mask,
                             document_segments, softcap)
from model.mlp import MLP, activation, hidden_width
from model.moe import MoE, MoEConfig, is_moe_block
from model.norm import RMSNorm


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # a model/mlp.py ACTIVATIONS name (CONFIG_MLP)
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    attn: str = "sdpa"  # sdpa | flash | reference (model/attention.py)
    attn_window: int = 0  # 0 = full causal; N = attend to the last N tokens, the current one included
    attn_softcap: float = 0.0  # 0 = off; else scores -> c * tanh(s / c) before the softmax
    final_logit_softcap: float = 0.0  # 0 = off; else logits -> c * tanh(logits / c)
    mtp_heads: int = 0  # extra heads predicting tokens t+2 .. t+1+mtp_heads
    mtp_weight: float = 0.0  # weight of their mean loss in the training objective
    moe: MoEConfig | None = None  # None = dense MLPs everywhere
    moe_every: int = 1  # blocks K, K+N, K+2N, ... are MoE (N = moe_every, K = moe_first_dense)
    moe_first_dense: int = 0
    checkpoint_every: int = 0  # activation checkpointing: 0 = off, N = blocks i with i % N == 0 recompute

    def __post_init__(self):
        # Cross-symbol rules Kconfig ranges cannot express; named by symbol.
        if self.n_embd % self.n_head:
            raise ValueError(f"CONFIG_N_EMBD={self.n_embd} is not divisible by CONFIG_N_HEAD={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"CONFIG_N_HEAD={self.n_head} is not divisible by CONFIG_N_KV_HEAD={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head width; N_EMBD/N_HEAD = {self.n_embd // self.n_head}")
        activation(self.mlp)  # UnknownActivation names the choices
        if self.attn not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attn!r}; expected one of {BACKENDS}")
        if self.attn == "sdpa" and self.attn_softcap:
            # Kconfig forbids this (ATTN_SOFTCAP depends on !ATTN_SDPA); this catches direct construction.
            raise ValueError(f"CONFIG_ATTN_SOFTCAP={self.attn_softcap} needs the flash or reference attention kernel"
                             " (choice ATTN), not sdpa: scaled_dot_product_attention cannot soft-cap scores")
        if self.attn_window < 0 or self.attn_softcap < 0 or self.final_logit_softcap < 0:
            raise ValueError("CONFIG_ATTN_WINDOW, CONFIG_ATTN_SOFTCAP and CONFIG_FINAL_LOGIT_SOFTCAP must be >= 0")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = off; CONFIG_ACT_CKPT_EVERY)")
        if self.moe is not None and not any(self.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(f"CONFIG_MOE=y but no block is MoE: CONFIG_MOE_FIRST_DENSE={self.moe_first_dense} and "
                             f"CONFIG_MOE_EVERY={self.moe_every} leave all {self.n_layer} blocks (CONFIG_N_LAYER) "
                             "dense; lower them or set CONFIG_MOE=n")

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and is_moe_block(i, self.moe_every, self.moe_first_dense)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return hidden_width(self.n_embd, self.mlp_ratio, self.mlp)

    @classmethod
    def from_dict(cls, saved: dict) -> "ModelConfig":
        """Inverse of dataclasses.asdict, as a checkpoint stores it; a field added since the checkpoint
        was written (checkpoint_every) takes its default."""
        moe = saved.get("moe")
        return cls(**{**saved, "moe": MoEConfig(**moe) if moe is not None else None})

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "ModelConfig":
        """Build from resolved Kconfig values (kconfig.tree.Config)."""
        moe = None
        if cfg.MOE:
            moe = MoEConfig.from_config(cfg, expert_hidden=hidden_width(cfg.N_EMBD, cfg.MOE_EXPERT_RATIO, cfg.MLP))
        return cls(
            vocab_size=vocab_size,
            block_size=cfg.BLOCK_SIZE,
            n_layer=cfg.N_LAYER,
            n_head=cfg.N_HEAD,
            n_kv_head=cfg.N_KV_HEAD or cfg.N_HEAD,
            n_embd=cfg.N_EMBD,
            norm=cfg.NORM,
            pos=cfg.POS,
            rope_theta=cfg.ROPE_THETA or 10000.0,
            mlp=cfg.MLP,
            mlp_ratio=cfg.MLP_RATIO,
            qk_norm=cfg.QK_NORM,
            bias=cfg.BIAS,
            dropout=cfg.DROPOUT,
            tie_embeddings=cfg.TIE_EMBEDDINGS,
            init_std=cfg.INIT_STD,
            attn=cfg.ATTN,
            attn_window=cfg.ATTN_WINDOW,
            attn_softcap=cfg.ATTN_SOFTCAP or 0.0,  # None while ATTN_SDPA hides it
            final_logit_softcap=cfg.FINAL_LOGIT_SOFTCAP,
            mtp_heads=cfg.MTP_HEADS,
            mtp_weight=cfg.MTP_WEIGHT or 0.0,
            moe=moe,
            moe_every=cfg.MOE_EVERY or 1,
            moe_first_dense=cfg.MOE_FIRST_DENSE or 0,
            checkpoint_every=cfg.ACT_CKPT_EVERY if cfg.ACT_CKPT else 0,
        )


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=config.bias)


def make_qk_norm(config: ModelConfig, dim: int) -> nn.Module:
    """QK-norm's per-head norm: RMSNorm with model/norm.py's backward (same parameter and state dict
    key as nn.RMSNorm), or make_norm's LayerNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    return make_norm(config, dim)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) for apply_rope, in HF Llama's rotate-half layout: channel
    i and i + head_dim/2 form a pair rotated by angle position * theta^(-2i/head_dim). cos is repeated
    over both halves and sin negated on the first, so a rotation is two products and a sum. GPT
    computes them once per model, as buffers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (x1, x2) halves of each head by position-dependent angles: (x1 cos - x2 sin,
    x2 cos + x1 sin), the same products and sums as HF Llama's x * cos + rotate_half(x) * sin.

    x: (B, H, T, D); cos and sin are rope_tables from position 0 (their first T rows are used) or,
    per token, (B, 1, T, D)."""
    if cos.dim() == 2:
        T = x.size(2)
        cos, sin = cos[:T], sin[:T]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + swapped * sin


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool = False):
        super().__init__()
        c = config
        self.ln_1 = make_norm(c, c.n_embd)
        self.attn = CausalSelfAttention(c, make_qk_norm, apply_rope)
        self.ln_2 = make_norm(c, c.n_embd)
        if moe:
            self.mlp = MoE(c.n_embd, c.mlp, c.moe, c.dropout)
        else:
            self.mlp = MLP(c.n_embd, c.mlp_hidden, c.mlp, bias=c.bias, dropout=c.dropout)

    def forward(self, x: torch.Tensor, rope, mask, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, c.is_moe_layer(i)) for i in range(c.n_layer))
        self.moe_layers = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        # Multi-token prediction: head j (1-based) is one more block predicting token t+1+j.
        self.mtp_blocks = nn.ModuleList(Block(c) for _ in range(c.mtp_heads))
        self.ln_f = make_norm(c, c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if c.pos == "rope":
            cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_every = c.checkpoint_every  # activation checkpointing: 0 = off, N = every Nth block
        self.loss_parts: dict[str, torch.Tensor] = {}  # the last training forward's detached loss terms
        self.apply(self._init_weights)
        for moe in self.moe_layers:
            moe.reset_parameters(c.init_std, c.init_std / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_scaled", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops position embeddings (as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token uses: all of them, less the routed experts an MoE layer skips."""
        return self.num_params(non_embedding) - sum(moe.inactive_params() for moe in self.moe_layers)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B), N the active parameters,
        L counting the multi-token-prediction blocks."""
        c = self.config
        layers = c.n_layer + c.mtp_heads
        return 6 * self.active_params() + 12 * layers * c.n_head * c.head_dim * c.block_size

    def _attention_mask(self, T: int, device) -> torch.Tensor | None:
        """The (T, T) bool mask shared by all layers, or None where the kernel needs none: SDPA with
        full causal attention uses is_causal, and flash-attn takes the window as an argument."""
        c = self.config
        if c.attn == "flash" or (c.attn == "sdpa" and not c.attn_window):
            return None
        return causal_mask(T, c.attn_window, device)

    def _cached_mask(self, T: int, start: int, device) -> torch.Tensor | None:
        """The (T, start + T) mask of queries at positions start.. over every cached key (a KV cache's
        step after its prefill); flash-attn aligns a shorter query block to the last keys itself."""
        if self.config.attn == "flash":
            return None
        return causal_mask(T, self.config.attn_window, device, offset=start)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                every_position: bool = False, doc: torch.Tensor | None = None):
        """Logits (B, T, V) and the mean cross-entropy when targets are given (ids -100 ignored).

        Without targets only the last position's logits are computed (generation), unless
        ``every_position`` (scoring text, as evaluation does). With ``cache``
        (generation only) idx holds the positions after the cached ones, which it then also holds.
        ``doc`` (B, T) int64 document ids (packed examples 0, 1, 2, ..., padding its own id): each
        run of equal ids attends only within itself and its positions start at 0, as if alone.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds CONFIG_BLOCK_SIZE={self.config.block_size}")
        if cache is not None and targets is not None:
            raise ValueError("a KV cache is for generation: pass targets or a cache, not both")
        if doc is not None:
            return self._forward_documents(idx, targets, every_position, doc, cache)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":  # a cache's positions start at its length
            rope = (self.rope_cos[start:], self.rope_sin[start:]) if start else (self.rope_cos, self.rope_sin)
        mask = self._attention_mask(T, idx.device) if start == 0 else self._cached_mask(T, start, idx.device)
        return self._trunk_and_loss(x, rope, mask, targets, every_position, cache)

    def _forward_documents(self, idx, targets, every_position, doc, cache):
        """forward with document ids: per-token positions and a (B, 1, T, T) mask for every kernel."""
        if cache is not None:
            raise ValueError("document ids (doc) are for training and scoring packed examples, not a KV cache")
        if doc.shape != idx.shape:
            raise ValueError(f"doc has shape {tuple(doc.shape)}; it needs idx's shape {tuple(idx.shape)}")
        segment, position = document_segments(doc.to(idx.device))
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(position)
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[position].unsqueeze(1), self.rope_sin[position].unsqueeze(1))
        mask = document_mask(segment, self.config.attn_window)
        return self._trunk_and_loss(x, rope, mask, targets, every_position, None, segment)

    def _trunk_and_loss(self, x, rope, mask, targets, every_position, cache, segment=None):
        """The blocks over embedded x, then logits and loss (segment: document_segments' ids, or None)."""
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, rope, mask, cache.layers[i])
            elif self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask)
        if cache is not None:
            cache.advance(x.size(1))
        if targets is None:
            return self._logits(x if every_position else x[:, -1:, :]), None
        logits = self._logits(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        if self.training and (self.mtp_blocks or self.moe_layers):
            loss = self._training_objective(loss, x, targets, rope, mask, segment)
        return logits, loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(self.ln_f(x)), self.config.final_logit_softcap)

    def _training_objective(self, lm_loss, x, targets, rope, mask, segment=None) -> torch.Tensor:
        """Next-token loss plus the weighted extra terms; each term lands detached in loss_parts.

        Only in training: evaluation reports the next-token loss alone, comparable across runs.
        With document segments (packed examples), a multi-token head's target at t+j counts only when
        it lies in t's example: the others are ignored (-100).
        """
        parts, loss = {"lm_loss": lm_loss.detach()}, lm_loss
        if self.mtp_blocks:
            # Head j sees the trunk's last hidden states; position t predicts token t+1+j = targets[:, t+j].
            extra = []
            for j, block in enumerate(self.mtp_blocks, start=1):
                logits = self._logits(block(x, rope, mask)[:, :-j])
                shifted = targets[:, j:]
                if segment is not None:
                    shifted = shifted.masked_fill(segment[:, j:] != segment[:, :-j], -100)
                extra.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                             shifted.reshape(-1)))
            mtp = torch.stack(extra).mean()
            loss = loss + self.config.mtp_weight * mtp
            parts["mtp_loss"] = mtp.detach()
        if self.moe_layers:
            # Averaged over MoE layers, so a coefficient means the same at any depth.
            aux = torch.stack([m.last["aux_loss"] for m in self.moe_layers]).mean()
            z = torch.stack([m.last["z_loss"] for m in self.moe_layers]).mean()
            moe = self.config.moe
            loss = loss + moe.aux_loss_coef * aux + moe.z_loss_coef * z
            parts.update(moe_aux_loss=aux.detach(), moe_z_loss=z.detach())
        self.loss_parts = parts
        return loss

    def cache_is_exact(self) -> bool:
        """Whether a KV-cache step computes what a forward over the whole context does: not with MoE
        capacity, whose token dropping depends on every token of the forward."""
        return not any(moe.config.capacity_factor for moe in self.moe_layers)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None,
                 vocab_limit: int | None = None, top_p: float = 1.0,
                 stop: Callable[[torch.Tensor], bool] | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        vocab_limit excludes the padding ids above the tokenizer's vocabulary; top_p 1 is off;
        ``stop(idx)`` returning True after a token ends generation there. The context is the last
        CONFIG_BLOCK_SIZE tokens. Up to that length a KV cache feeds each new token alone (the
        prompt in one prefill); past it the window slides, every position's hidden states change
        with it, and each step recomputes the cropped window as a forward without cache does, so
        cached and uncached generation give the same tokens. use_cache=False always recomputes.
        """
        block = self.config.block_size
        cache = KVCache(self.config.n_layer, block) if use_cache and self.cache_is_exact() else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block:
                logits, _ = self(idx[:, cache.length:], cache=cache)
            else:
                logits, _ = self(idx[:, -block:])
            nxt = sample_next(logits[:, -1, :vocab_limit].float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if stop is not None and stop(idx):
                break
        return idx


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """The index in text of the earliest stop string occurrence at or after start, else None."""
    found = [i for s in stop if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V), (B, 1): greedy at temperature 0, else sampled from
    softmax(logits / temperature) restricted to the top_k ids (0 = all) and then to the top_p
    nucleus (1 = all)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely ids whose
    probability reaches p, the rest -inf. An id stays when the ids more likely than it hold less
    than p; the most likely id always stays."""
    probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    cumulative = probs.cumsum(dim=-1)
    before = torch.cat((torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]), dim=-1)
    drop_sorted = before >= p
    drop_sorted[..., 0] = False  # the most likely id, even at p = 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
