"""Peak training memory per device for model/gpt.py's GPT, predicted in closed form.

``predict_memory`` counts the bytes one training step keeps alive, term by term, so a plan can be
checked against a device before anything is allocated; ``predict_run_memory`` is its largest value
over a run's curriculum. train/memory_measure.py measures the same peak on CPU (tests compare).
Post-training (OBJECTIVE sft or dpo, LoRA) changes some terms: ``Objective`` and
``post_training_memory`` below.

When the peak happens: with ``zero_grad(set_to_none=True)`` no gradients exist during the forward,
so the early candidate is the start of backward: weights + optimizer state + everything saved for
backward + the cross-entropy gradients (or, for a small vocabulary, the last block's MLP backward).
Backward then frees activations while it allocates gradients, roughly one for one per block, so
the late candidate is the end of backward and the optimizer step: weights + grads + optimizer
state. The peak is the larger of the two; a training step never holds all four terms at once.

Each feature's factors live next to the feature: the MLP activations' in model/mlp.py, the
attention kernels' in model/attention.py, the MoE layer's in model/moe.py, the optimizers' state
in optim/state_size.py. This module composes them: saved activations per block, the backward
peak, optimizer state, and data-parallel sharding.

The counts follow the kernels torch picks on CPU, where they are measured, and a fused AdamW (as
optim/optimizers.py builds); torch's foreach AdamW, the CUDA default, adds up to one more fp32
copy of the parameters at the step. On CUDA, known differences: dropout keeps 1-byte masks
instead of activation-sized ones, the flash/efficient attention kernels handle dropout without
keeping T x T probabilities, and RMSNorm may use a fused kernel that keeps only input and rstd.
The flash kernel is predicted as SDPA's fused kernel (both keep q, k, v, the output and a
logsumexp). The reference attention keeps B x n_head x T x T probabilities, and under
ATTN_SOFTCAP the tanh output as well; its terms were fitted to measurements.

Parameters include every routed expert, router, shared expert and multi-token-prediction block;
Muon's step adds Newton-Schulz temporaries for its largest matrix at the late moment. With an MoE
capacity the dropped assignments are data-dependent and not subtracted (an upper bound). Each MTP
head keeps a full dense block and its own ln_f / lm_head / log-softmax over B x (T - j) rows, and
its backward runs first, so its cross-entropy gradients set the early moment. A checkpointed block
keeps only its input; its backward reruns the forward, a third candidate moment: its full saved
set next to what earlier blocks keep and the grads of everything after it. When the last block is
MoE and the batch is small, its backward moment is approximate (measured up to +3%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model import attention
from model import moe as moe_layer
from model.gpt import ModelConfig
from model.mlp import activation, fan_out
from optim.muon import STACK_ELEMENTS_DEFAULT
from optim.state_size import newton_schulz_bytes, state_size

if TYPE_CHECKING:
    from kconfig.values import Config
    from train.curriculum import Curriculum

GIB = 2**30
FP32 = 4  # weights, grads, optimizer state and the residual stream
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of matmul outputs under autocast
SHARDING = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")


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
    """Parameters of GPT(config) by what the memory terms need, in closed form."""

    total: int  # every parameter once (a tied head shares wte's)
    matrices: int  # hidden matrices: attention, MLPs, routers, expert stacks, MTP blocks (Muon's share)
    cast: int  # weights autocast (or MoE's explicit cast) copies each forward: the matrices but routers, + lm_head
    blocks: tuple[int, ...]  # each trunk block's parameters
    blocks_cast: tuple[int, ...]  # each trunk block's share of ``cast``


@dataclass(frozen=True)
class Step:
    """The shape of one micro-batch: rows, sequence length and a matmul output's element size."""

    batch: int
    seq: int
    act_bytes: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def autocast(self) -> bool:
        """Whether matmuls run in a lower precision than the fp32 weights (then weights are copied)."""
        return self.act_bytes != FP32


def _norm_params(config: ModelConfig, dim: int) -> int:
    return dim * (2 if config.norm == "layernorm" and config.bias else 1)


def block_params(config: ModelConfig, moe: bool) -> tuple[int, int, int]:
    """(parameters, matrices, cast weights) of one Block."""
    c, C = config, config.n_embd
    kv = c.n_kv_head * c.head_dim
    attn = C * (C + 2 * kv) + C**2
    rest = (C + 2 * kv) + C if c.bias else 0
    rest += 2 * _norm_params(c, C) + (2 * _norm_params(c, c.head_dim) if c.qk_norm else 0)
    if not moe:
        H = c.mlp_hidden
        mlp = C * fan_out(H, c.mlp) + H * C
        rest += fan_out(H, c.mlp) + C if c.bias else 0
        return attn + mlp + rest, attn + mlp, attn + mlp
    m, He = c.moe, c.moe.expert_hidden
    experts = m.n_experts * (C * fan_out(He, c.mlp) + He * C)  # w_in (E, C, fan_out), w_out (E, H, C)
    shared = C * fan_out(m.n_shared * He, c.mlp) + m.n_shared * He * C  # one dense MLP, no bias
    router = C * m.n_experts  # fp32, never cast
    mats = attn + experts + shared + router
    return mats + rest, mats, mats - router


def param_counts(config: ModelConfig) -> ParamCounts:
    """Every parameter of GPT(config), experts, routers, shared experts and MTP blocks included."""
    c = config
    per_block = [block_params(c, c.is_moe_layer(i)) for i in range(c.n_layer)]
    mtp = block_params(c, False)
    embed = c.vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * c.n_embd
    total = sum(b[0] for b in per_block) + c.mtp_heads * mtp[0] + embed + _norm_params(c, c.n_embd) + head
    matrices = sum(b[1] for b in per_block) + c.mtp_heads * mtp[1]
    cast = sum(b[2] for b in per_block) + c.mtp_heads * mtp[2] + c.vocab_size * c.n_embd
    return ParamCounts(total, matrices, cast, tuple(b[0] for b in per_block), tuple(b[2] for b in per_block))


# -- saved activations ---------------------------------------------------------------------------

def norm_saved(config: ModelConfig, rows: int, width: int, in_bytes: int) -> int:
    """What a norm saves besides its input: LayerNorm mean and rstd; RMSNorm (decomposed on
    CPU) rstd, the fp32 normalized tensor and an fp32 copy of a low-precision input."""
    if config.norm == "layernorm":
        return 2 * rows * FP32
    return rows * FP32 + rows * width * FP32 * (1 + (in_bytes != FP32))


def block_saved(config: ModelConfig, step: Step, moe: bool) -> int:
    """What one (not recomputed) block keeps for backward: its norms, attention and MLP or MoE layer."""
    c, T, N, a, f = config, step.seq, step.tokens, step.act_bytes, FP32
    C = c.n_embd
    # The residual stream is fp32 (fp32 embeddings; adding a low-precision branch promotes), so the
    # norm inputs are fp32, while autocast saves low-precision copies of what enters each Linear.
    saved = 2 * N * C * f + 2 * norm_saved(c, N, C, f)  # residual stream into ln_1 and ln_2
    saved += 2 * N * C * a  # inputs of attn.c_attn and attn.c_proj (= attention output)
    if c.pos == "rope" and step.autocast:
        saved += 2 * T * c.head_dim * a  # cos and sin cast for q and for k, saved by the rotation
    if c.qk_norm:
        saved += norm_saved(c, N * c.n_head, c.head_dim, a) + norm_saved(c, N * c.n_kv_head, c.head_dim, a)
    saved += attention.saved_bytes(c, step.batch, T, a)
    saved += N * C * a if c.dropout else 0  # the dropout mask after the MLP (CPU dropout keeps a scaled mask)
    if moe:
        return saved + moe_layer.saved_bytes(c.moe, c.mlp, N, C, a)
    return saved + N * C * a + activation(c.mlp).saved_bytes(N, c.mlp_hidden, a)  # + mlp.c_fc's input


def head_saved(config: ModelConfig, step: Step, rows: int) -> int:
    """ln_f's input (the last block's whole output), ln_f's statistics, lm_head's input and the
    log-softmax, over the rows one head predicts; the logit soft-cap keeps tanh's output."""
    c, N, a, f = config, step.tokens, step.act_bytes, FP32
    C, V = c.n_embd, c.vocab_size
    capped = rows * V * a if c.final_logit_softcap else 0
    return N * C * f + norm_saved(c, rows, C, f) + rows * C * a + rows * V * f + capped


def checkpointed_blocks(config: ModelConfig, checkpoint_every: int) -> list[int]:
    return [i for i in range(config.n_layer) if checkpoint_every and i % checkpoint_every == 0]


def saved_by_block(config: ModelConfig, step: Step, checkpoint_every: int, i: int) -> int:
    """What trunk block i keeps for backward; a checkpointed block only its input."""
    if checkpoint_every and i % checkpoint_every == 0:
        return step.tokens * config.n_embd * FP32
    return block_saved(config, step, config.is_moe_layer(i))


def recast_bytes(config: ModelConfig, step: Step, counts: ParamCounts, checkpoint_every: int) -> int:
    """Autocast's weight copies of the checkpointed blocks: they live in its cache until the forward
    ends, but backward does not keep them (a recomputed block casts its weights again)."""
    if not step.autocast:
        return 0
    return sum(counts.blocks_cast[i] for i in checkpointed_blocks(config, checkpoint_every)) * step.act_bytes


def saved_activations(config: ModelConfig, step: Step, counts: ParamCounts, checkpoint_every: int) -> int:
    """Everything the forward keeps for backward: blocks, masks, ids, weight copies, the heads."""
    c, B, T, N, a, f = config, step.batch, step.seq, step.tokens, step.act_bytes, FP32
    saved = sum(saved_by_block(c, step, checkpoint_every, i) for i in range(c.n_layer))
    saved += attention.mask_bytes(c, T)
    saved += N * c.n_embd * f if c.dropout else 0  # embedding dropout mask
    saved += 2 * N * 8 + (T * 8 if c.pos == "learned" else 0)  # token ids x, y and position ids
    if step.autocast:  # autocast's low-precision weight copies
        saved += counts.cast * a - recast_bytes(c, step, counts, checkpoint_every)
    saved += head_saved(c, step, N)
    # Multi-token prediction: head j is one more dense block on the trunk's output (already kept as
    # ln_f's input) and the shared ln_f + lm_head over the B * (T - j) positions that have a target,
    # whose shifted targets are a copy.
    for j in range(1, c.mtp_heads + 1):
        saved += block_saved(c, step, False) - N * c.n_embd * f + head_saved(c, step, B * (T - j)) + B * (T - j) * 8
    return saved


# -- the backward peak ---------------------------------------------------------------------------

def last_mlp_backward(config: ModelConfig, step: Step) -> int:
    """lm_head's and the last MLP's weight grads, the residual-stream gradient and the MLP's
    gradient temporaries: the last block in backward order (the last MTP block with MTP, which is
    dense) during its MLP backward."""
    c, N, a, f = config, step.tokens, step.act_bytes, FP32
    C, H = c.n_embd, c.mlp_hidden
    if c.mtp_heads or not c.is_moe_layer(c.n_layer - 1):
        mlp = H * C * f + activation(c.mlp).backward_temp_bytes(N, H, a)
    else:
        mlp = moe_layer.backward_bytes(c.moe, c.mlp, N, C, a)
    return (c.vocab_size * C + N * C) * f + mlp


def recompute_peak(config: ModelConfig, step: Step, counts: ParamCounts, checkpoint_every: int, i: int) -> int:
    """Backward of checkpointed block i reruns its forward: its full saved set (and weight copies)
    comes back next to what earlier blocks keep and the grads of everything after it."""
    c, N, a, f = config, step.tokens, step.act_bytes, FP32
    C, H = c.n_embd, c.mlp_hidden
    after = sum(counts.blocks[i + 1:]) + counts.total - sum(counts.blocks)  # grads so far
    before = sum(saved_by_block(c, step, checkpoint_every, j) for j in range(i))
    again = block_saved(c, step, c.is_moe_layer(i)) + (counts.blocks_cast[i] * a if step.autocast else 0)
    temps = N * C * f + activation(c.mlp).backward_temp_bytes(N, H, a) + H * C * f
    return after * f + before + again + temps + logits_held(c, step) + 2 * N * 8


def logits_held(config: ModelConfig, step: Step) -> int:
    """lm_head's output, still referenced by the caller through the step."""
    return step.tokens * config.vocab_size * step.act_bytes


def activation_peak(config: ModelConfig, step: Step, counts: ParamCounts, checkpoint_every: int) -> int:
    """The activation term of the early moments: the start of backward, the last MLP's backward,
    the forward's end under autocast, and each checkpointed block's recompute."""
    peak = saved_activations(config, step, counts, checkpoint_every) + logits_held(config, step)
    peak += max(early_moments(config, step, counts, checkpoint_every))
    for i in checkpointed_blocks(config, checkpoint_every):
        peak = max(peak, recompute_peak(config, step, counts, checkpoint_every, i))
    return peak


def early_moments(config: ModelConfig, step: Step, counts: ParamCounts, checkpoint_every: int) -> tuple[int, int, int]:
    """(start of backward, the last MLP's backward, the forward's end): bytes each adds to the saved
    activations and the held logits."""
    c, N, a, f = config, step.tokens, step.act_bytes, FP32
    C, V = c.n_embd, c.vocab_size
    last = step.batch * (step.seq - c.mtp_heads)  # rows of the head whose backward runs first (the last MTP head's)
    # Two moments in backward before most grads exist: its first op, where the log-softmax's and the
    # logits' fp32 gradients join everything saved; and the last block's MLP backward, where the
    # head's tensors are gone but the grads of last_mlp_backward and the freed c_proj input are not.
    at_mlp = last_mlp_backward(c, step) - head_saved(c, step, last) + N * C * f - (V * C * a if step.autocast else 0)
    # Under autocast the forward's end can be higher still: the last logits' fp32 copy and ln_f's
    # fp32 output are alive next to the log-softmax, and the cache still holds every weight copy.
    at_forward_end = (last * V + N * C) * f + recast_bytes(c, step, counts, checkpoint_every) if step.autocast else 0
    return 2 * last * V * f, at_mlp, at_forward_end


# -- optimizer state and the late moment ---------------------------------------------------------

def optimizer_state_bytes(optimizer: str, counts: ParamCounts) -> int:
    size = state_size(optimizer)
    return (size.matrices * counts.matrices + size.others * (counts.total - counts.matrices)) * FP32


def muon_matrix_shapes(config: ModelConfig) -> list[tuple[int, int, int, int]]:
    """(parameters, matrices per parameter, rows, cols) of every kind of matrix Muon orthogonalizes:
    attention, dense MLPs (MTP heads' blocks included), expert stacks, routers and shared experts."""
    c = config
    kv = c.n_kv_head * c.head_dim
    blocks = c.n_layer + c.mtp_heads
    moe_blocks = sum(c.is_moe_layer(i) for i in range(c.n_layer))
    shapes = [(blocks, 1, c.n_embd + 2 * kv, c.n_embd), (blocks, 1, c.n_embd, c.n_embd)]
    if dense := blocks - moe_blocks:
        shapes += [(dense, 1, fan_out(c.mlp_hidden, c.mlp), c.n_embd), (dense, 1, c.n_embd, c.mlp_hidden)]
    if c.moe is not None:
        m, He = c.moe, c.moe.expert_hidden
        shapes += [(moe_blocks, m.n_experts, c.n_embd, fan_out(He, c.mlp)), (moe_blocks, m.n_experts, He, c.n_embd),
                   (moe_blocks, 1, m.n_experts, c.n_embd)]
        if m.n_shared:
            shapes += [(moe_blocks, 1, fan_out(m.n_shared * He, c.mlp), c.n_embd),
                       (moe_blocks, 1, c.n_embd, m.n_shared * He)]
    return shapes


def step_end(config: ModelConfig, step: Step, counts: ParamCounts, optimizer: str) -> int:
    """Bytes besides weights and state at the end of backward and the optimizer step."""
    c = config
    late = counts.total * FP32 + logits_held(c, step) + 2 * step.tokens * 8  # grads, logits, token ids
    if state_size(optimizer).newton_schulz:
        late += newton_schulz_bytes(muon_matrix_shapes(c), STACK_ELEMENTS_DEFAULT)
    if c.tie_embeddings:  # wte's embedding grad and its sum with lm_head's
        late += 2 * c.vocab_size * c.n_embd * FP32
    return late


def apply_sharding(estimate: MemoryEstimate, late: int, counts: ParamCounts, shard: str,
                   world_size: int) -> MemoryEstimate:
    """What each of ``world_size`` data-parallel ranks keeps (parallel/runtime.py): "ddp" splits
    nothing and its gradient buckets hold a second copy of the grads; "zero1" splits the optimizer
    state, "zero2" also the grads, "zero3" and "fsdp" also the weights, plus one gathered block's
    weights while it runs."""
    weights, grads, activations = estimate.weights, estimate.grads, estimate.activations
    state = estimate.optimizer_state
    if shard != "none" and world_size > 1:
        W = world_size
        gathered = max(counts.blocks) * FP32 if shard in ("zero3", "fsdp") else 0  # the running block, unsharded
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


# -- post-training: SFT, DPO, LoRA ---------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: the Linear it sits on (a suffix such as "mlp.c_fc", or "lm_head"), its sizes."""

    layer: str
    block: int | None  # its block: trunk block i, or n_layer + j - 1 for MTP block j; None for lm_head
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class Objective:
    """What a post-training objective changes in a step's memory (train/post_training.py): its kind
    (CONFIG_OBJECTIVE), SFT_PACKING's document mask, and LoRA's rank, adapters and frozen base."""

    kind: str = "pretrain"  # "pretrain", "sft" or "dpo"
    packing: bool = False
    lora_rank: int = 0  # 0: no LoRA (full fine-tuning)
    lora_dropout: bool = False
    embedding_trained: bool = False  # with LoRA: wte (and an untied lm_head) train in full (added tokens)
    base_bf16: bool = False
    adapters: tuple[Adapter, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config, config: ModelConfig, embedding_trained: bool = True) -> Objective:
        """``embedding_trained``: whether a LoRA run trains the embedding in full, as PostTraining does
        when the chat template adds tokens to the tokenizer (its ``trained_in_full``); only the trainer
        knows, so the default is the larger prediction."""
        if cfg.OBJECTIVE == "pretrain":
            return cls()
        from train.lora import LoraSettings

        lora = LoraSettings.from_config(cfg)
        packing = cfg.OBJECTIVE == "sft" and cfg.SFT_PACKING
        if lora is None:
            return cls(cfg.OBJECTIVE, packing)
        return cls(cfg.OBJECTIVE, packing, lora.rank, lora.dropout > 0, embedding_trained, lora.base_bf16,
                   adapters(config, lora))


def adapters(config: ModelConfig, lora) -> tuple[Adapter, ...]:
    """The adapters train/lora.py puts on GPT(config) for LoraSettings ``lora`` (a model on the meta
    device gives the matched Linear layers' sizes; an unmatched target is its LoraError)."""
    import dataclasses

    import torch

    from model.gpt import GPT
    from train.lora import matching_modules

    with torch.device("meta"):  # shapes only; any kernel will do (flash-attn needs a GPU to build)
        model = GPT(dataclasses.replace(config, attn="reference"))
    modules = dict(model.named_modules())
    out = []
    for name in matching_modules(model, lora):
        parts = name.split(".")
        block = (int(parts[1]) if parts[0] == "blocks" else config.n_layer + int(parts[1]) if parts[0] == "mtp_blocks"
                 else None)
        layer = ".".join(parts[2:]) if parts[0] in ("blocks", "mtp_blocks") else name
        out.append(Adapter(layer, block, modules[name].in_features, modules[name].out_features))
    return tuple(out)


def lora_activation_change(config: ModelConfig, step: Step, objective: Objective, checkpoint_every: int) -> int:
    """What LoRA changes in the saved activations (negative: saves). A frozen Linear without an
    adapter keeps no input (its weight alone gives the input's gradient): attn.c_attn's, mlp.c_fc's,
    mlp.c_proj's (the activation's output), lm_head's, an MoE layer's router and experts'; a frozen
    RMSNorm gain no normalized tensor; block 0's ln_1 nothing behind a frozen embedding. Each adapter
    keeps its A-projection (rows x rank) for B's gradient, with LORA_DROPOUT its dropout's mask too,
    and under autocast a low-precision copy of A and B; with LORA_BASE_BF16 under bf16 autocast the
    base weights need no copy. attn.c_proj's input stays (SDPA keeps its output)."""
    c, N, a, r = config, step.tokens, step.act_bytes, objective.lora_rank
    adapted = {(x.layer, x.block) for x in objective.adapters}
    change = 0
    # A frozen RMSNorm gain needs no normalized tensor (its grad's input): ln_f's, each MTP head's.
    rms = FP32 if c.norm == "rmsnorm" else 0
    change -= (N + sum(step.batch * (step.seq - j) for j in range(1, c.mtp_heads + 1))) * c.n_embd * rms
    for i in range(c.n_layer + c.mtp_heads):  # the trunk's blocks, then the MTP blocks (dense)
        if i < c.n_layer and checkpoint_every and i % checkpoint_every == 0:
            continue  # keeps its input only
        change -= 2 * N * c.n_embd * rms  # ln_1's and ln_2's
        if c.qk_norm:
            change -= N * (c.n_head + c.n_kv_head) * c.head_dim * rms
        if ("attn.c_attn", i) not in adapted:
            change -= N * c.n_embd * a
        if i < c.n_layer and c.is_moe_layer(i):  # frozen router and experts: their inputs (fitted: -3% measured)
            change -= N * c.n_embd * FP32 + N * c.moe.top_k * (c.n_embd + c.moe.expert_hidden) * a
        else:
            change -= N * c.n_embd * a if ("mlp.c_fc", i) not in adapted else 0
            change -= N * c.mlp_hidden * a if ("mlp.c_proj", i) not in adapted else 0
    if objective.embedding_trained:
        change += N * 8  # the embedding's backward keeps the token ids
    elif not (checkpoint_every and 0 % checkpoint_every == 0):
        change -= N * c.n_embd * FP32 + norm_saved(c, N, c.n_embd, FP32)  # block 0's ln_1 input and statistics
    if ("lm_head", None) not in adapted and not objective.embedding_trained:  # its input, each MTP head's too
        change -= (N + sum(step.batch * (step.seq - j) for j in range(1, c.mtp_heads + 1))) * c.n_embd * a
    for x in objective.adapters:
        if x.block is not None and x.block < c.n_layer and checkpoint_every and x.block % checkpoint_every == 0:
            continue
        change += N * r * a + (N * x.fan_in * a if objective.lora_dropout else 0)
        change += r * (x.fan_in + x.fan_out) * a if step.autocast else 0
    if objective.base_bf16 and a == 2 and step.autocast:
        change -= param_counts(c).cast * a  # already bf16: autocast copies nothing
    return change


def lora_backward_change(config: ModelConfig, step: Step, objective: Objective) -> int:
    """What LoRA changes at the last MLP's backward (early_moments' second): no weight grads for the
    frozen lm_head and mlp.c_proj; what that moment frees of the head (lm_head's input, its weight
    copy) lora_activation_change has taken out already."""
    c, N, a = config, step.tokens, step.act_bytes
    change = -c.vocab_size * c.n_embd * (FP32 - full_bytes(objective))  # the head's grad: none, or in bf16
    change -= c.mlp_hidden * c.n_embd * FP32 if c.mtp_heads or not c.is_moe_layer(c.n_layer - 1) else 0
    if not objective.embedding_trained and not any(x.layer == "lm_head" for x in objective.adapters):
        change += N * c.n_embd * a
    last = c.n_layer - 1
    adapted = {(x.layer, x.block) for x in objective.adapters}
    if not c.mtp_heads and not c.is_moe_layer(last) and ("mlp.c_proj", last) not in adapted:
        # the MLP's gradient temporaries stand where c_proj's input was (fitted on GELU; SwiGLU -2%)
        change += N * c.mlp_hidden * a - N * c.n_embd * FP32
    if objective.base_bf16 and a == 2 and step.autocast:
        change += c.vocab_size * c.n_embd * a
    return change


def full_bytes(objective: Objective) -> int:
    """Bytes per element of what a LoRA run trains in full (its grads and AdamW state): 0 when nothing
    does; 2 for a bf16 base (those parameters are bf16 too)."""
    return 0 if not objective.embedding_trained else 2 if objective.base_bf16 else FP32


def lora_params(objective: Objective) -> tuple[int, int]:
    """(adapter parameters, those on lm_head): A is rank x in, B out x rank; lm_head's go to AdamW under Muon."""
    r = objective.lora_rank
    total = sum(r * (x.fan_in + x.fan_out) for x in objective.adapters)
    return total, sum(r * (x.fan_in + x.fan_out) for x in objective.adapters if x.layer == "lm_head")


def post_training_memory(config: ModelConfig, micro_batch: int, seq_len: int, act_bytes: int, optimizer: str,
                         counts: ParamCounts, checkpoint_every: int, objective: Objective, shard: str,
                         world_size: int) -> MemoryEstimate:
    """predict_memory for OBJECTIVE sft or dpo (train/post_training.py's loss).

    The loss keeps no logits past its return (``logits_held`` is not counted). SFT with packing adds
    the document mask (model/attention.py's document_mask_bytes) and the ids GPT.forward derives.
    DPO runs 2 x micro_batch rows (chosen, then rejected) through the policy, then the reference
    under no_grad; the forward's end is a further moment: the saved set, the policy's and the
    reference's logits and five fp32 (2B, T, V) temporaries (the two log-softmaxes the loss and
    token_kl share, and token_kl's exp, difference and product). Without LoRA the reference is a frozen fp32 copy of the weights (counted
    in ``weights``); with LoRA it is the same model with its adapters off. LoRA: the base has no grads
    and no optimizer state (bf16 with LORA_BASE_BF16), the adapters both (``lora_activation_change``
    for the activations). With LoRA, ``embedding_trained`` adds the embedding's grads and state
    (PostTraining's trained_in_full; bf16 under LORA_BASE_BF16), and a bf16 base computes in bf16
    without autocast too. Measured on CPU within 5% (tests/test_memory.py); under bf16 autocast LoRA
    runs measure 2-5% above the prediction (some bf16-step tensor is not counted)."""
    c, f = config, FP32
    dpo, lora = objective.kind == "dpo", objective.lora_rank > 0
    # A bf16 base under autocast keeps a bf16 residual stream (its embedding is bf16); without autocast
    # the adapters' fp32 outputs promote it back to fp32.
    bf16_stream = lora and objective.base_bf16 and act_bytes == 2
    if lora and objective.base_bf16:
        act_bytes = 2  # a bf16 base computes in bf16 without autocast too
    step = Step(2 * micro_batch if dpo else micro_batch, seq_len, act_bytes)
    N, V = step.tokens, c.vocab_size
    late = step_end(c, step, counts, optimizer) - logits_held(c, step)
    saved = saved_activations(c, step, counts, checkpoint_every)
    if lora:
        change = lora_activation_change(c, step, objective, checkpoint_every)
        if bf16_stream:  # the norms' inputs (a checkpointed block's input) and LayerNorm's statistics
            kept = c.n_layer - len(checkpointed_blocks(c, checkpoint_every)) + c.mtp_heads
            stats = 2 * (2 * kept + 1) * N * 2 if c.norm == "layernorm" else 0
            change -= (2 * kept + 1 + len(checkpointed_blocks(c, checkpoint_every))) * N * c.n_embd * 2 + stats
        saved += change
        start, at_mlp, at_forward_end = early_moments(c, step, counts, checkpoint_every)
        activations = saved + max(start, at_mlp + lora_backward_change(c, step, objective), at_forward_end)
        trained = lora_params(objective)[0] * f + V * c.n_embd * (1 + (not c.tie_embeddings)) * full_bytes(objective)
        for i in checkpointed_blocks(c, checkpoint_every):  # with the trained parameters' grads, not the base's
            base_grads = (sum(counts.blocks[i + 1:]) + counts.total - sum(counts.blocks) + c.mlp_hidden * c.n_embd) * f
            activations = max(activations, recompute_peak(c, step, counts, checkpoint_every, i) + change
                              - logits_held(c, step) - base_grads + trained)
    else:
        activations = activation_peak(c, step, counts, checkpoint_every) - logits_held(c, step)
    if objective.packing:
        # Each block keeps its converted mask; the (B, T, T) mask they share is gone when backward
        # starts (measured), the document and position ids are not.
        _, per_block = attention.document_mask_bytes(c, step.batch, step.seq, act_bytes)
        kept = c.n_layer - len(checkpointed_blocks(c, checkpoint_every)) + c.mtp_heads
        activations += kept * per_block + 2 * N * 8
    if dpo:
        forward_end = saved + 2 * N * V * step.act_bytes + 5 * N * V * f
        activations = max(activations, forward_end)
    weights, grads, state = counts.total * f, counts.total * f, optimizer_state_bytes(optimizer, counts)
    if dpo and not lora:
        weights += counts.total * f  # the frozen reference
    if lora:
        size, (adapter, on_head) = state_size(optimizer), lora_params(objective)
        full = V * c.n_embd * (1 if c.tie_embeddings else 2)  # wte and an untied lm_head, when trained in full
        weights = counts.total * (2 if objective.base_bf16 else f) + adapter * f
        weights += full * full_bytes(objective) if dpo else 0  # the reference's copy of their starting values
        grads = adapter * f + full * full_bytes(objective)
        state = (size.matrices * (adapter - on_head) + size.others * on_head) * f
        state += size.others * full * full_bytes(objective)
        # the grads and token ids; with a tied head, wte's embedding grad and its sum with lm_head's;
        # Newton-Schulz over a rank-r matrix is small
        late = grads + 2 * N * 8 + (2 * V * c.n_embd * full_bytes(objective) if c.tie_embeddings else 0)
    unsharded = MemoryEstimate(weights, grads, state, activations, total=0)
    return apply_sharding(unsharded, late, counts, shard, world_size)


# -- the prediction ------------------------------------------------------------------------------

def predict_memory(config: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                   optimizer: str = "adamw", world_size: int = 1, checkpoint_every: int = 0,
                   shard: str = "none", objective: Objective | None = None) -> MemoryEstimate:
    """Predicted peak bytes per device of one training step (forward, backward, optimizer step).

    Weights, grads and optimizer state are fp32 (autocast keeps parameters fp32). The caller is
    assumed to hold the returned logits through backward and the optimizer step, as
    train/trainer.py's ``_, loss = ...`` does. ``optimizer`` is a CONFIG_OPTIMIZER value.
    ``shard`` says what data parallelism over ``world_size`` ranks splits (``apply_sharding``); the
    activations are per rank already: micro_batch is per rank. ``checkpoint_every`` is
    GPT.checkpoint_every: 0 = off, N = blocks i with i % N == 0 are recomputed in backward.
    ``objective``: a post-training run's SFT, DPO and LoRA terms (``Objective``); None is pretraining.
    """
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_BYTES)}")
    state_size(optimizer)  # UnknownOptimizer names the known ones
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if shard not in SHARDING:
        raise ValueError(f"unknown shard {shard!r}; expected one of {SHARDING}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = off), got {checkpoint_every}")
    counts = param_counts(config)
    if objective is not None and objective.kind != "pretrain":
        return post_training_memory(config, micro_batch, seq_len, ACT_BYTES[dtype], optimizer, counts,
                                    checkpoint_every, objective, shard, world_size)
    step = Step(micro_batch, seq_len, ACT_BYTES[dtype])
    weights = grads = counts.total * FP32
    unsharded = MemoryEstimate(weights, grads, optimizer_state_bytes(optimizer, counts),
                               activation_peak(config, step, counts, checkpoint_every), total=0)
    return apply_sharding(unsharded, step_end(config, step, counts, optimizer), counts, shard, world_size)


def predict_run_memory(cfg: Config, curriculum: Curriculum, config: ModelConfig, dtype: str, world_size: int = 1,
                       shard: str = "none", embedding_trained: bool = True) -> MemoryEstimate:
    """A run's predicted peak per device: the largest over its curriculum stages' batch shapes, for
    the optimizer cfg.OPTIMIZER, the model's activation checkpointing and the objective
    (cfg.OBJECTIVE: SFT, DPO, LoRA; ``Objective.from_config``, whose ``embedding_trained`` the
    trainer knows: bool(PostTraining.trained_in_full))."""
    objective = Objective.from_config(cfg, config, embedding_trained)
    return max((predict_memory(config, batch, seq, dtype, cfg.OPTIMIZER, world_size=world_size,
                               checkpoint_every=config.checkpoint_every, shard=shard, objective=objective)
                for batch, seq in curriculum.shapes()), key=lambda m: m.total)
