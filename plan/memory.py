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

Parameters include every routed expert, router, shared expert and multi-token-prediction block;
Muon keeps one fp32 buffer for the hidden matrices (routers and expert stacks too) and AdamW two
for the rest, and its step adds Newton-Schulz temporaries for its largest matrix at the late moment.
An MoE layer keeps, instead of the dense MLP's tensors: the router's fp32 input and scores (N x E),
the top-k indices and gates, the sort order and token ids (N*k int64), the gathered inputs, the
w_out product and its gated copy (N*k x C), the experts' activations (N*k x hidden), a shared
expert's activations, and under autocast its explicit bf16 copies of w_in and w_out. With a
capacity the dropped assignments are data-dependent and not subtracted (an upper bound). Each MTP
head keeps a full dense block and its own ln_f / lm_head / log-softmax over B x (T - j) rows, and
its backward runs first, so its cross-entropy gradients set the early moment. A checkpointed block
keeps only its input; its backward reruns the forward, a third candidate moment: its full saved
set next to what earlier blocks keep and the grads of everything after it. When the last block is
MoE and the batch is small, its backward moment is approximate (measured up to +3%).
"""

from __future__ import annotations

import contextlib
import math
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
SHARDING = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")
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


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of GPT(c) by what the memory terms need, in closed form."""

    total: int  # every parameter once (a tied head shares wte's)
    matrices: int  # hidden matrices: attention, MLPs, routers, expert stacks, MTP blocks (Muon's share)
    cast: int  # weights autocast (or MoE's explicit cast) copies each forward: the matrices but routers, + lm_head
    blocks: tuple[int, ...]  # each trunk block's parameters
    blocks_cast: tuple[int, ...]  # each trunk block's share of ``cast``


def _block_params(c: ModelConfig, moe: bool) -> tuple[int, int, int]:
    """(parameters, matrices, cast weights) of one Block."""
    kv = c.n_kv_head * c.head_dim
    norm = lambda d: d * (2 if c.norm == "layernorm" and c.bias else 1)  # noqa: E731
    attn = c.n_embd * (c.n_embd + 2 * kv) + c.n_embd**2
    rest = (c.n_embd + 2 * kv) + c.n_embd if c.bias else 0
    rest += 2 * norm(c.n_embd) + (2 * norm(c.head_dim) if c.qk_norm else 0)
    if not moe:
        fan_out = 2 * c.mlp_hidden if c.mlp == "swiglu" else c.mlp_hidden
        mlp = c.n_embd * fan_out + c.mlp_hidden * c.n_embd
        rest += fan_out + c.n_embd if c.bias else 0
        return attn + mlp + rest, attn + mlp, attn + mlp
    m, He = c.moe, c.moe.expert_hidden
    width = lambda h: 2 * h if c.mlp == "swiglu" else h  # noqa: E731
    experts = m.n_experts * (c.n_embd * width(He) + He * c.n_embd)  # w_in (E, C, fan_out), w_out (E, H, C)
    shared = c.n_embd * width(m.n_shared * He) + m.n_shared * He * c.n_embd  # one dense MLP, no bias
    router = c.n_embd * m.n_experts  # fp32, never cast
    mats = attn + experts + shared + router
    return mats + rest, mats, mats - router


def param_counts(c: ModelConfig) -> ParamCounts:
    """Every parameter of GPT(c), experts, routers, shared experts and MTP blocks included."""
    per_block = [_block_params(c, c.is_moe_layer(i)) for i in range(c.n_layer)]
    mtp = _block_params(c, False)
    norm = c.n_embd * (2 if c.norm == "layernorm" and c.bias else 1)
    embed = c.vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * c.n_embd
    total = sum(b[0] for b in per_block) + c.mtp_heads * mtp[0] + embed + norm + head
    matrices = sum(b[1] for b in per_block) + c.mtp_heads * mtp[1]
    cast = sum(b[2] for b in per_block) + c.mtp_heads * mtp[2] + c.vocab_size * c.n_embd
    return ParamCounts(total, matrices, cast, tuple(b[0] for b in per_block), tuple(b[2] for b in per_block))


def predict_memory(mcfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                   optimizer: str = "adamw", world_size: int = 1, checkpoint_every: int = 0,
                   shard: str = "none") -> MemoryEstimate:
    """Predicted peak bytes per device of one training step (forward, backward, optimizer step).

    Weights, grads and optimizer state are fp32 (autocast keeps parameters fp32). The caller is
    assumed to hold the returned logits through backward and the optimizer step, as
    train/trainer.py's ``_, loss = ...`` does. ``shard`` says what data parallelism over
    ``world_size`` ranks splits (parallel/runtime.py): "none" (one process), "ddp" (nothing split;
    DDP's gradient buckets hold a second copy of the grads), "zero1" (optimizer state / world),
    "zero2" (also grads), "zero3" and "fsdp" (also weights, plus one gathered block's weights while it
    runs). The activations are per rank already: micro_batch is per rank. ``checkpoint_every`` is GPT.checkpoint_every (CONFIG_ACT_CKPT_EVERY):
    0 = off, N = blocks i with i % N == 0 are recomputed in backward.
    """
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_BYTES)}")
    if optimizer not in STATE_TENSORS:
        raise ValueError(f"unknown optimizer {optimizer!r}; predict_memory knows {sorted(STATE_TENSORS)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if shard not in SHARDING:
        raise ValueError(f"unknown shard {shard!r}; expected one of {SHARDING}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = off), got {checkpoint_every}")
    c, f, a = mcfg, 4, ACT_BYTES[dtype]
    B, T, N = micro_batch, seq_len, micro_batch * seq_len
    C, H, V, nh = c.n_embd, c.mlp_hidden, c.vocab_size, c.n_head
    kv = c.n_kv_head * c.head_dim
    counts = param_counts(c)

    def norm(rows: int, width: int, in_bytes: int) -> int:
        """What a norm saves besides its input: LayerNorm mean and rstd; RMSNorm (decomposed on
        CPU) rstd, the fp32 normalized tensor and an fp32 copy of a low-precision input."""
        if c.norm == "layernorm":
            return 2 * rows * f
        return rows * f + rows * width * f * (1 + (in_bytes != f))

    def mlp_act(rows: int, hidden: int) -> int:
        """gelu/relu2: activation input and output; swiglu: gate|up, silu(gate), silu(gate) * up."""
        return (4 if c.mlp == "swiglu" else 2) * rows * hidden * a

    # The residual stream is fp32 (fp32 embeddings; adding a low-precision branch promotes), so the
    # norm inputs are fp32, while autocast saves low-precision copies of what enters each Linear.
    block = 2 * N * C * f + 2 * norm(N, C, f)  # residual stream into ln_1 and ln_2
    block += 2 * N * C * a  # inputs of attn.c_attn and attn.c_proj (= attention output)
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
    dense_block = block + N * C * a + mlp_act(N, H)  # + mlp.c_fc's input and the MLP's activations
    moe_block = block + (moe_saved(c.moe, N, C, f, a, mlp_act) if c.moe else 0)

    def saved_by(i: int) -> int:
        """What trunk block i keeps for backward; a checkpointed block only its input."""
        if checkpoint_every and i % checkpoint_every == 0:
            return N * C * f
        return moe_block if c.is_moe_layer(i) else dense_block

    def head(rows: int) -> int:
        """ln_f's input (the last block's whole output), ln_f's statistics, lm_head's input and the
        log-softmax, over the rows one head predicts; the logit soft-cap keeps tanh's output."""
        return N * C * f + norm(rows, C, f) + rows * C * a + rows * V * f + (rows * V * a if c.final_logit_softcap else 0)

    checkpointed = [i for i in range(c.n_layer) if checkpoint_every and i % checkpoint_every == 0]
    # Autocast's weight copies live in its cache until the forward ends; backward keeps only those
    # saved by blocks that are not recomputed (a recomputed block casts its weights again).
    recast = sum(counts.blocks_cast[i] for i in checkpointed) * a if a != f else 0
    saved = sum(saved_by(i) for i in range(c.n_layer))
    saved += T * T if c.attn == "reference" or (c.attn == "sdpa" and c.attn_window) else 0  # the bool mask
    saved += N * C * f if c.dropout else 0  # embedding dropout mask
    saved += 2 * N * 8 + (T * 8 if c.pos == "learned" else 0)  # token ids x, y and position ids
    saved += counts.cast * a - recast if a != f else 0  # autocast's low-precision weight copies
    saved += head(N)
    # Multi-token prediction: head j is one more dense block on the trunk's output (already kept as
    # ln_f's input) and the shared ln_f + lm_head over the B * (T - j) positions that have a target,
    # whose shifted targets are a copy.
    for j in range(1, c.mtp_heads + 1):
        saved += dense_block - N * C * f + head(B * (T - j)) + B * (T - j) * 8
    logits_held = N * V * a  # lm_head output, still referenced by the caller
    last = B * (T - c.mtp_heads)  # rows of the head whose backward runs first (the last MTP head's)

    # Two moments in backward before most grads exist: its first op, where the log-softmax's and the
    # logits' fp32 gradients join everything saved; and the last block's MLP backward, where the
    # head's tensors are gone but lm_head's and c_proj's weight grads, the residual-stream gradient
    # and these (B, T, mlp_hidden) gradient temporaries beyond the freed c_proj input are alive:
    # gelu: gelu's grad; swiglu: the grads of silu and up; relu2: pow-backward's three temporaries.
    # (The last block in backward order is the last MTP block with MTP, which is dense.)
    mlp_temps = {"gelu": 1, "swiglu": 2, "relu2": 3}[c.mlp]
    if c.mtp_heads or not c.is_moe_layer(c.n_layer - 1):
        at_mlp = (V * C + H * C + N * C) * f + mlp_temps * N * H * a
    else:  # an MoE block's w_out grad and temporaries over the N * top_k assignments
        m = c.moe
        at_mlp = (V * C + m.n_experts * m.expert_hidden * C + N * C) * f + mlp_temps * N * m.top_k * m.expert_hidden * a
    at_mlp += -head(last) + N * C * f - (V * C * a if a != f else 0)
    # Under autocast the forward's end can be higher still: the last logits' fp32 copy and ln_f's
    # fp32 output are alive next to the log-softmax, and the cache still holds every weight copy.
    at_forward_end = (last * V + N * C) * f + recast if a != f else 0
    activations = saved + logits_held + max(2 * last * V * f, at_mlp, at_forward_end)

    weights = grads = counts.total * f
    if checkpointed:
        # Backward of a checkpointed block i reruns its forward: its full saved set (and weight copies)
        # comes back next to what earlier blocks keep and the grads of everything after it.
        def recompute(i: int) -> int:
            after = sum(counts.blocks[i + 1:]) + counts.total - sum(counts.blocks)  # grads so far
            before = sum(saved_by(j) for j in range(i))
            again = (moe_block if c.is_moe_layer(i) else dense_block) + (counts.blocks_cast[i] * a if a != f else 0)
            temps = N * C * f + mlp_temps * N * H * a + H * C * f
            return after * f + before + again + temps + logits_held + 2 * N * 8
        activations = max(activations, max(recompute(i) for i in checkpointed))
    if optimizer == "muon":
        state = (counts.matrices + 2 * (counts.total - counts.matrices)) * f
    else:
        state = STATE_TENSORS[optimizer] * counts.total * f
    late = grads + logits_held + 2 * N * 8  # end of backward / optimizer step
    late += muon_step_temps(c) if optimizer == "muon" else 0
    late += 2 * V * C * f if c.tie_embeddings else 0  # wte's embedding grad and its sum with lm_head's
    if shard != "none" and world_size > 1:  # data parallelism: what each rank keeps of the model's state
        W = world_size
        gathered = max(counts.blocks) * f if shard in ("zero3", "fsdp") else 0  # the running block, unsharded
        if shard == "ddp":
            late += grads  # the reducer's buckets
        state //= W if shard != "ddp" else 1
        if shard in ("zero2", "zero3", "fsdp"):
            late -= grads - grads // W
            grads //= W
        if shard in ("zero3", "fsdp"):
            weights //= W
            activations += gathered
            late += gathered
    return MemoryEstimate(weights, grads, state, activations, weights + state + max(activations, late))


def muon_step_temps(c: ModelConfig) -> int:
    """Bytes Muon's step allocates for its largest matrix (stack) while grads are all alive.

    optim/muon.py's Newton-Schulz in fp32 (its CPU default) holds the Nesterov update, the
    normalized X and the next X (three copies of the matrix), and the Gram matrix X X^T with
    its polynomial (two b x s x s, s the smaller side). torch.optim.Muon and CUDA's bf16
    iteration hold a little less; this is the fp32 count.
    """
    kv = c.n_kv_head * c.head_dim
    width = lambda h: 2 * h if c.mlp == "swiglu" else h  # noqa: E731
    shapes = [(1, c.n_embd + 2 * kv, c.n_embd), (1, c.n_embd, c.n_embd)]  # (stack, rows, cols)
    if c.moe is None or c.mtp_heads or not all(c.is_moe_layer(i) for i in range(c.n_layer)):
        shapes += [(1, width(c.mlp_hidden), c.n_embd), (1, c.n_embd, c.mlp_hidden)]
    if c.moe is not None:
        m, He = c.moe, c.moe.expert_hidden
        shapes += [(m.n_experts, c.n_embd, width(He)), (m.n_experts, He, c.n_embd), (1, m.n_experts, c.n_embd)]
        if m.n_shared:
            shapes += [(1, width(m.n_shared * He), c.n_embd), (1, c.n_embd, m.n_shared * He)]
    return max(3 * b * r * k * 4 + 2 * b * min(r, k) ** 2 * 4 for b, r, k in shapes)


def moe_saved(m, N: int, C: int, f: int, a: int, mlp_act) -> int:
    """What model/moe.py's MoE layer keeps for backward over N tokens (replacing the dense MLP's).

    Assignments: N * top_k, or with a capacity at most n_experts * capacity (the tokens dropped
    depend on the data and are not subtracted, so this is an upper bound).
    """
    E, k, He = m.n_experts, m.top_k, m.expert_hidden
    Nk = N * k
    if m.capacity_factor:
        Nk = min(Nk, E * math.ceil(m.capacity_factor * N * k / E))
    saved = N * C * f  # the router's input: ln_2's fp32 output (the router runs in fp32)
    saved += N * E * f  # softmax / sigmoid scores, fp32
    saved += N * k * 8 + N * k * f + N * f  # top-k indices (gather's index), the gates, their sum
    saved += 2 * Nk * 8  # sort order (index of the gates' gather) and token ids (index of x's gather, index_add_)
    saved += Nk * a  # the gates gathered per assignment, in the compute dtype
    saved += 3 * Nk * C * a  # gathered inputs, the w_out product and its gated copy (index_add_'s source)
    saved += mlp_act(Nk, He)  # the experts' hidden activations
    if m.n_shared:  # one dense MLP over all tokens: its input copy under autocast, its activations
        saved += (N * C * a if a != f else 0) + mlp_act(N, m.n_shared * He)
    if m.z_loss_coef:
        saved += N * E * f + N * f  # logsumexp's input (the logits) and output
    if m.score == "sigmoid" and m.aux_loss_coef:
        saved += N * f  # the per-token sum normalizing the scores for the balance loss
    return saved


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
