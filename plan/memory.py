"""Peak training memory per device for model/gpt.py's GPT: predicted in closed form, and measured.

``predict_memory`` counts the bytes one training step keeps alive, term by term, so a plan can be
checked against a device before anything is allocated. ``measure_peak_memory`` runs real steps on
CPU and tracks every live tensor storage, which is what tests/test_memory.py compares against.

When the peak happens: with ``zero_grad(set_to_none=True)`` no gradients exist during the forward,
so the early candidate is the start of backward: weights + optimizer state + everything saved for
backward + the cross-entropy gradients (or, for a small vocabulary, the last block's MLP backward).
Backward then frees activations while it allocates gradients, roughly one for one per block, so
the late candidate is the end of backward and the optimizer step: weights + grads + optimizer
state. The peak is the larger of the two; a training step never holds all four terms at once.

The counts follow the kernels torch picks on CPU, where they are measured, and a fused AdamW (as
optim/optimizers.py builds); torch's foreach AdamW, the CUDA default, adds up to one more fp32
copy of the parameters at the step. On CUDA, known differences: dropout keeps 1-byte masks
instead of activation-sized ones, the flash/efficient attention kernels handle dropout without
keeping T x T probabilities, and RMSNorm may use a fused kernel that keeps only input and rstd.
ATTN_FLASH is predicted as SDPA's fused kernel (both keep q, k, v, the output and a logsumexp).
The reference attention (ATTN_REFERENCE) keeps B x n_head x T x T probabilities, and under
ATTN_SOFTCAP the tanh output as well; its terms were fitted to measurements.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.gpt import ModelConfig

GIB = 2**30
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of matmul outputs under autocast
# fp32 state tensors per parameter; "muon": momentum for the hidden matrices, AdamW's two moments elsewhere
STATE_TENSORS = {"adamw": 2, "sgd": 1, "lion": 1, "muon": (1, 2)}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. ``total`` is the predicted peak, not the sum: activations and grads are
    never all alive at once (see the module docstring)."""

    weights: int
    grads: int
    optimizer_state: int
    activations: int
    total: int

    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        g = lambda n: f"{n / scale:.2f}"  # noqa: E731
        return (f"peak {g(self.total)} {unit} = weights {g(self.weights)} + optimizer {g(self.optimizer_state)}"
                f" + max(activations {g(self.activations)}, grads {g(self.grads)}) ({unit})")


def param_counts(c: ModelConfig) -> tuple[int, int]:
    """(all parameters, Linear weights) of GPT(c), in closed form."""
    kv = c.n_kv_head * c.head_dim
    fan_out = 2 * c.mlp_hidden if c.mlp == "swiglu" else c.mlp_hidden
    norm = lambda d: d * (2 if c.norm == "layernorm" and c.bias else 1)  # noqa: E731
    linear = c.n_embd * (c.n_embd + 2 * kv) + c.n_embd**2 + c.n_embd * fan_out + c.mlp_hidden * c.n_embd
    bias = (c.n_embd + 2 * kv) + c.n_embd + fan_out + c.n_embd if c.bias else 0
    block = linear + bias + 2 * norm(c.n_embd) + (2 * norm(c.head_dim) if c.qk_norm else 0)
    embed = c.vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * c.n_embd
    total = c.n_layer * block + embed + norm(c.n_embd) + head
    return total, c.n_layer * linear + c.vocab_size * c.n_embd


def predict_memory(mcfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                   optimizer: str = "adamw", world_size: int = 1) -> MemoryEstimate:
    """Predicted peak bytes per device of one training step (forward, backward, optimizer step).

    Weights, grads and optimizer state are fp32 (autocast keeps parameters fp32). The caller is
    assumed to hold the returned logits through backward and the optimizer step, as
    train/trainer.py's ``_, loss = ...`` does. ``world_size`` is validated but not used yet:
    nothing is sharded, so every device holds the full step; ZeRO/FSDP-style sharding will
    divide terms by it.
    """
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_BYTES)}")
    if optimizer not in STATE_TENSORS:
        raise ValueError(f"unknown optimizer {optimizer!r}; predict_memory knows {sorted(STATE_TENSORS)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    c, f, a = mcfg, 4, ACT_BYTES[dtype]
    B, T, N = micro_batch, seq_len, micro_batch * seq_len
    C, H, V, nh = c.n_embd, c.mlp_hidden, c.vocab_size, c.n_head
    kv = c.n_kv_head * c.head_dim
    params, linear_weights = param_counts(c)

    def norm(rows: int, width: int, in_bytes: int) -> int:
        """What a norm saves besides its input: LayerNorm mean and rstd; RMSNorm (decomposed on
        CPU) rstd, the fp32 normalized tensor and an fp32 copy of a low-precision input."""
        if c.norm == "layernorm":
            return 2 * rows * f
        return rows * f + rows * width * f * (1 + (in_bytes != f))

    # The residual stream is fp32 (fp32 embeddings; adding a low-precision branch promotes), so the
    # norm inputs are fp32, while autocast saves low-precision copies of what enters each Linear.
    block = 2 * N * C * f + 2 * norm(N, C, f)  # residual stream into ln_1 and ln_2
    block += 3 * N * C * a  # inputs of attn.c_attn, attn.c_proj (= attention output) and mlp.c_fc
    # gelu/relu2 MLP: activation input and output; swiglu: gate|up, silu(gate), silu(gate) * up.
    block += (4 if c.mlp == "swiglu" else 2) * N * H * a
    if c.pos == "rope" and a != f:
        block += 2 * T * c.head_dim * a  # cos and sin cast for q and for k, saved by the rotation
    if c.qk_norm:
        block += norm(N * nh, c.head_dim, a) + norm(N * c.n_kv_head, c.head_dim, a)
    scores = B * nh * T * T * a  # one B x n_head x T x T tensor in the matmul dtype
    if c.dropout == 0:
        # The fused attention kernel keeps q, k, v (views of c_attn's output) and the logsumexp.
        block += N * (C + 2 * kv) * a + N * nh * f
        rotated = c.pos == "rope" or c.qk_norm
        if rotated:
            # Rotated or normalized q and k are new (B, n_head, T, hd) tensors; the attention output
            # then comes out in that layout, and c_proj's input is a separate (B, T, C) copy of it.
            block += N * (C + kv) * a + N * C * a
        if c.attn == "reference":
            # Measured: the probabilities, k and v repeated to n_head under GQA, and with RoPE alone
            # (no QK-norm) none of the rotated q/k and output copies the fused kernel keeps.
            block += scores + 2 * N * (C - kv) * a
            block -= N * (C + kv) * a + N * C * a if c.pos == "rope" and not c.qk_norm else 0
        elif c.attn == "sdpa" and c.attn_window:
            block += T * T * a  # the boolean window mask, converted to an additive one and kept
    else:
        # No CPU fused kernel takes dropout: the math path keeps fp32 copies of scaled q and of k, v
        # (repeated to n_head), and three B x n_head x T x T tensors: softmax, dropout mask, dropped.
        block += 3 * N * C * f + 3 * B * nh * T * T * f
        block += N * (C + 2 * kv) * a if c.qk_norm else 0  # qk-norm keeps c_attn's output as its input
        block += 2 * N * C * a  # dropout masks after attention and MLP (CPU dropout keeps a scaled mask)
    if c.attn == "reference" and c.attn_softcap:
        block += scores  # tanh's output, kept for its backward
    saved = c.n_layer * block
    saved += T * T if c.attn == "reference" or (c.attn == "sdpa" and c.attn_window) else 0  # the bool mask
    saved += N * C * f if c.dropout else 0  # embedding dropout mask
    saved += 2 * N * 8 + (T * 8 if c.pos == "learned" else 0)  # token ids x, y and position ids
    saved += linear_weights * a if a != f else 0  # autocast's low-precision weight copies
    head = N * C * f + norm(N, C, f) + N * C * a + N * V * f  # ln_f input, lm_head input, log-softmax
    head += N * V * a if c.final_logit_softcap else 0  # tanh's output inside the logit soft-cap
    logits_held = N * V * a  # lm_head output, still referenced by the caller

    # Two moments in backward before most grads exist: its first op, where the log-softmax's and the
    # logits' fp32 gradients join everything saved; and the last block's MLP backward, where the
    # head's tensors are gone but lm_head's and c_proj's weight grads, the residual-stream gradient
    # and these (B, T, mlp_hidden) gradient temporaries beyond the freed c_proj input are alive:
    # gelu: gelu's grad; swiglu: the grads of silu and up; relu2: pow-backward's three temporaries.
    mlp_temps = {"gelu": 1, "swiglu": 2, "relu2": 3}[c.mlp] * N * H * a
    at_mlp = (V * C + H * C + N * C) * f + mlp_temps - head - (V * C * a if a != f else 0)
    # Under autocast the forward's end can be higher still: the logits' fp32 copy and ln_f's fp32
    # output are alive next to the log-softmax.
    at_forward_end = (N * V + N * C) * f if a != f else 0
    activations = saved + head + logits_held + max(2 * N * V * f, at_mlp, at_forward_end)

    weights = grads = params * f
    if optimizer == "muon":
        hidden = linear_weights - c.vocab_size * c.n_embd  # the blocks' matrices, Muon's share
        state = (hidden + 2 * (params - hidden)) * f
    else:
        state = STATE_TENSORS[optimizer] * params * f
    late = grads + logits_held + 2 * N * 8  # end of backward / optimizer step
    late += 2 * V * C * f if c.tie_embeddings else 0  # wte's embedding grad and its sum with lm_head's
    return MemoryEstimate(weights, grads, state, activations, weights + state + max(activations, late))


class _LiveStorage(TorchDispatchMode):
    """Tracks the bytes of every distinct tensor storage alive, and their peak."""

    def __init__(self, tensors=()):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()  # _cdata: the StorageImpl, shared by views
        if nbytes == 0 or key in self.sizes:
            return
        self.sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key).atexit = False  # fires when the storage dies

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def measure_peak_memory(model, optimizer, make_batch, dtype: str = "fp32", steps: int = 2) -> int:
    """Measured peak bytes of live tensor storage over ``steps`` CPU training steps.

    Each step runs like train/trainer.py's: forward (under CPU autocast unless fp32), backward,
    optimizer.step(), zero_grad(set_to_none=True), with the logits referenced until the step
    ends (the trainer's ``_``). Parameters, buffers, existing grads and optimizer state count
    from the start; the peak is the largest number of bytes alive at once.
    """
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_BYTES)}")
    before = [*model.parameters(), *model.buffers()]
    before += [p.grad for p in model.parameters() if p.grad is not None]
    before += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracker = _LiveStorage(before)
    with tracker:
        for _ in range(steps):
            x, y = make_batch()
            with torch.autocast("cpu", dtype=AUTOCAST[dtype]) if dtype in AUTOCAST else contextlib.nullcontext():
                logits, loss = model(x, y)  # noqa: F841 (referenced through the step, as in the trainer)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, loss
    return tracker.peak
