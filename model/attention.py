"""Causal self-attention and its three interchangeable kernels (CONFIG_ATTN: sdpa, flash, reference).

Every backend computes the same function of (q, k, v): causal attention, optionally restricted
to a sliding window of the last ``window`` tokens (the current one included) and with the scores
soft-capped as ``c * tanh(s / c)`` before the softmax (Gemma 2). They differ in speed and memory:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. Fused kernels on CPU and CUDA;
  a window is passed as an explicit boolean mask. It has no soft-capping (Kconfig forbids the pair).
- ``flash``: the flash-attn package's ``flash_attn_func`` (CUDA, compute capability 8.0+), with
  native window and soft-capping. Imported lazily so the module imports anywhere; building a model
  without it raises ``FlashAttentionUnavailable`` naming the option and the fix.
- ``reference``: plain matmul + mask + softmax, written to be read and used by tests to check the
  others. It keeps B x n_head x T x T scores and probabilities.

Document masking (packed fine-tuning examples): ``document_mask`` gives each sequence of a batch its
own (T, T) mask, causal and confined to runs of equal document ids (and to the window), so no token
attends across two packed examples; SDPA and the reference kernel take it as a (B, 1, T, T) mask.
flash-attn's dense kernel takes no mask, so with document ids a model configured for it computes
that layer through SDPA with the mask (the reference kernel where scores are soft-capped): the same
function, exact on CPU and GPU alike, at SDPA's speed for those forwards.

``saved_bytes`` and ``mask_bytes`` are what each kernel keeps for backward, for train/memory.py;
``document_mask_bytes`` what a document mask adds.
``KVCache`` holds each layer's keys and values during generation (GPT.generate), so a new token
attends to the cached ones instead of recomputing the whole sequence; training never passes one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "reference")


class FlashAttentionUnavailable(RuntimeError):
    """CONFIG_ATTN_FLASH was chosen where flash-attn cannot run."""


def check_flash_available() -> None:
    """Raise FlashAttentionUnavailable unless flash-attn imports and a CUDA GPU with sm80+ exists."""
    fix = ("CONFIG_ATTN is flash: that kernel needs the flash-attn package (`pip install flash-attn`) and a CUDA "
           "GPU with compute capability 8.0+ (Ampere or newer); choose the sdpa kernel otherwise")
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise FlashAttentionUnavailable(f"{fix}: flash-attn is not importable ({e})") from None
    if not torch.cuda.is_available():
        raise FlashAttentionUnavailable(f"{fix}: no CUDA device is available")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise FlashAttentionUnavailable(f"{fix}: this GPU has compute capability {major}.{minor}")


def causal_mask(T: int, window: int, device=None, offset: int = 0) -> torch.Tensor:
    """(T, offset + T) bool, True where query i may attend to key j: j <= i and, with a window,
    i - j < window. Queries are positions offset .. offset + T - 1 (offset: the positions a KV cache
    already holds), keys 0 .. offset + T - 1.

    One vectorized comparison (no loop over tokens); GPT.forward builds it once per forward and
    shares it between layers.
    """
    i = torch.arange(offset, offset + T, device=device).unsqueeze(1)
    j = torch.arange(offset + T, device=device).unsqueeze(0)
    allowed = j <= i
    if window:
        allowed = allowed & (i - j < window)
    return allowed


def document_segments(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, position), both (B, T) int64, of document ids ``doc`` (B, T): a segment is a run of
    equal ids (a new one starts wherever the id changes, so ids need only differ between neighbours),
    numbered 0, 1, ... along each row, and position counts from 0 at each segment's first token."""
    T = doc.size(1)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    t = torch.arange(T, device=doc.device).expand_as(doc)
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # each token's segment start
    return starts.long().cumsum(dim=1) - 1, t - first


def document_mask(segment: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may attend to key j when causal_mask allows it and both lie in the
    same segment (document_segments). The diagonal is always allowed, so no row is empty."""
    T = segment.size(1)
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    return (same & causal_mask(T, window, segment.device)).unsqueeze(1)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): smooth, bounded to (-cap, cap), ~x for |x| << cap. cap 0 = identity."""
    return cap * torch.tanh(x / cap) if cap else x


def reference_attention(q, k, v, mask: torch.Tensor, cap: float = 0.0, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention spelled out: q (B, H, T, D), k and v (B, Hkv, T, D), mask (T, T) or (B, 1, T, T) bool
    (True = keep)."""
    groups = q.size(1) // k.size(1)
    if groups > 1:  # grouped-query attention: each k/v head serves `groups` consecutive query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    scores = softcap(scores, cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
    return probs.to(v.dtype) @ v


def sdpa_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """torch's SDPA: is_causal for full causal attention (mask None), else the explicit mask."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
        enable_gqa=q.size(1) != k.size(1))


def flash_attention(q, k, v, window: int, cap: float, dropout_p: float = 0.0) -> torch.Tensor:
    """flash-attn's kernel, which takes (B, T, H, D) and handles GQA, window and soft-cap itself."""
    from flash_attn import flash_attn_func

    extra = {"softcap": cap} if cap else {}  # flash-attn < 2.6 has no softcap argument
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                        causal=True, window_size=(window - 1, 0) if window else (-1, -1), **extra)
    return y.transpose(1, 2)


def mask_bytes(config, seq: int) -> int:
    """The (T, T) bool mask GPT.forward builds once and keeps for backward: only where the kernel
    takes one (reference attention, or SDPA with a window)."""
    return seq * seq if config.attn == "reference" or (config.attn == "sdpa" and config.attn_window) else 0


def document_mask_bytes(config, batch: int, seq: int, act_bytes: int) -> tuple[int, int]:
    """(once per forward, per block) bytes a document mask (GPT.forward's ``doc``) adds to what
    mask_bytes and saved_bytes count: the (B, T, T) bool mask replaces the (T, T) one; per block, SDPA
    (and flash-attn, which runs documents through SDPA) keeps the mask converted to an additive one
    in the activation dtype, and the reference kernel its (B, T, T) inverse. Measured on CPU."""
    B, T, a = batch, seq, act_bytes
    shared = B * T * T - mask_bytes(config, T)
    if config.attn == "reference":
        return shared, (B - 1) * T * T  # its (T, T) inverse without documents
    if config.attn == "flash" and config.attn_softcap:  # through the reference kernel; flash itself keeps none
        return shared, B * T * T
    return shared, B * T * T * a - (T * T * a if config.attn == "sdpa" and config.attn_window else 0)


def saved_bytes(config, batch: int, seq: int, act_bytes: int) -> int:
    """Bytes one attention kernel keeps for backward beyond c_attn's and c_proj's inputs, per block
    (config: model/gpt.py's ModelConfig), measured on CPU; act_bytes: a matmul output's element size."""
    c, B, T, N, a, f = config, batch, seq, batch * seq, act_bytes, 4
    C, nh, kv = c.n_embd, c.n_head, c.n_kv_head * c.head_dim
    scores = B * nh * T * T * a  # one B x n_head x T x T tensor in the matmul dtype
    saved = 0
    if c.dropout == 0:
        # The fused attention kernel keeps q, k, v (views of c_attn's output) and the logsumexp.
        saved += N * (C + 2 * kv) * a + N * nh * f
        if c.pos == "rope" or c.qk_norm:
            # Rotated or normalized q and k are new (B, n_head, T, hd) tensors; the attention output
            # then comes out in that layout, and c_proj's input is a separate (B, T, C) copy of it.
            # (RoPE and model/norm.py's fp32 RMSNorm keep c_attn's layout and so no copy; the
            # pinned predictions keep this term, an over-estimate of N * C * a, for the fused kernel.)
            saved += N * (C + kv) * a + N * C * a
        if c.attn == "reference":
            # Measured: the probabilities, k and v repeated to n_head under GQA, and with RoPE alone
            # (no QK-norm) none of the rotated q/k and output copies the fused kernel keeps; with
            # model/norm.py's fp32 QK-norm two (B, T, C) tensors less.
            saved += scores + 2 * N * (C - kv) * a
            saved -= N * (C + kv) * a + N * C * a if c.pos == "rope" and not c.qk_norm else 0
            saved -= 2 * N * C * a if c.qk_norm and c.norm == "rmsnorm" and a == f else 0
        elif c.attn == "sdpa" and c.attn_window:
            saved += T * T * a  # the boolean window mask, converted to an additive one and kept
    else:
        # No CPU fused kernel takes dropout: the math path keeps fp32 copies of scaled q and of k, v
        # (repeated to n_head), and three B x n_head x T x T tensors: softmax, dropout mask, dropped.
        saved += 3 * N * C * f + 3 * B * nh * T * T * f
        saved += N * (C + 2 * kv) * a if c.qk_norm else 0  # qk-norm keeps c_attn's output as its input
        saved += N * C * a  # the dropout mask after c_proj (CPU dropout keeps a scaled mask)
    if c.attn == "reference" and c.attn_softcap:
        saved += scores  # tanh's output, kept for its backward
    return saved


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    Each layer's (B, n_kv_head, capacity, head_dim) buffers are allocated on its first append, in
    the dtype and on the device of its keys; ``length`` counts the positions stored (every layer
    holds the same ones). Keys are stored after QK-norm and RoPE, as the kernels consume them.
    """

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(n_layer)]

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more positions once every layer has appended them."""
        self.length += tokens


class LayerCache:
    """One layer's slice of a KVCache."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached positions; return all keys and values so far."""
        start, end = self.cache.length, self.cache.length + k.size(2)
        if end > self.cache.capacity:
            raise ValueError(f"KV cache of {self.cache.capacity} positions cannot take {end}")
        if self.k is None:
            shape = (k.size(0), k.size(1), self.cache.capacity, k.size(3))
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        if start == 0:  # a prefill attends over exactly the tensors a forward without cache uses
            return k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Projections, QK-norm and RoPE around the configured attention kernel."""

    def __init__(self, config, make_norm, apply_rope):
        super().__init__()
        self.config = config
        self.apply_rope = apply_rope
        if config.attn == "flash":
            check_flash_available()
        kv_dim = config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = make_norm(config, config.head_dim)
            self.k_norm = make_norm(config, config.head_dim)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, C); rope (cos, sin) or None; mask the (T, T) causal/window mask, None when SDPA
        runs full causal attention or flash-attn applies the window itself, or a (B, 1, T, T)
        document mask (packed examples) for every kernel.

        With ``cache`` (generation) x holds the positions after the cached ones: rope's tables start
        at the first of them, k and v are appended to the cache and the queries attend to all of it;
        mask is then (T, cached + T), or None for a prefill under full-causal SDPA or flash-attn.
        """
        B, T, C = x.shape
        config = self.config
        kv_dim = config.n_kv_head * config.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, config.n_head, config.head_dim).transpose(1, 2)
        k = k.view(B, T, config.n_kv_head, config.head_dim).transpose(1, 2)
        v = v.view(B, T, config.n_kv_head, config.head_dim).transpose(1, 2)
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        p = config.dropout if self.training else 0.0
        if config.attn == "reference":
            y = reference_attention(q, k, v, mask, config.attn_softcap, p)
        elif config.attn == "flash" and mask is not None and mask.dim() == 4:  # document mask: see the top
            y = (reference_attention(q, k, v, mask, config.attn_softcap, p) if config.attn_softcap
                 else sdpa_attention(q, k, v, mask, p))
        elif config.attn == "flash":
            y = flash_attention(q, k, v, config.attn_window, config.attn_softcap, p)
        else:
            y = sdpa_attention(q, k, v, mask, p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
