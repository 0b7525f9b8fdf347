"""Which Hugging Face architecture expresses a model exactly, its config.json, and the weight mapping.

Three targets, each an exact match of one option set (model/gpt.py's ModelConfig):

- ``GPT2LMHeadModel``: LayerNorm, learned positions, exact GELU, one key/value head per query head.
  BIAS=n exports zero biases (GPT-2 always has them). Its Conv1D layers store weights (in, out):
  ours, nn.Linear's (out, in), are transposed.
- ``LlamaForCausalLM``: RMSNorm, RoPE, SwiGLU, grouped-query attention. BIAS=y maps to its
  attention_bias and mlp_bias (the same linear layers as ours).
- ``Qwen3ForCausalLM``: the LLaMA set plus QK-norm (per-head RMSNorm before RoPE, as ours), no bias.

Our RoPE rotates the two halves of each head (x1 = first half, x2 = second half), which is
transformers' ``rotate_half``: q and k rows are copied unpermuted. The gated MLP's ``c_fc`` holds
gate then up (model/mlp.py). Everything else is refused with ``ExportRefused`` naming the blocking
symbols. Multi-token-prediction heads have no counterpart and are left out (``notes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kconfig.errors import NamedError
from model.gpt import ModelConfig

RMS_EPS = 1e-6  # model/gpt.py make_norm: nn.RMSNorm(dim, eps=1e-6)
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default


class ExportRefused(NamedError, ValueError):
    """No Hugging Face architecture computes this model's function exactly."""


@dataclass(frozen=True)
class Target:
    architecture: str
    model_type: str
    needs: tuple[tuple[str, str, object], ...]  # (symbol, value wanted as written, ModelConfig predicate)


def _symbols(c: ModelConfig) -> dict[str, str]:
    """The model's value of each symbol a target constrains, spelled as in .config."""
    yn = lambda b: "y" if b else "n"  # noqa: E731
    return {"NORM": c.norm, "POS": c.pos, "MLP": c.mlp, "QK_NORM": yn(c.qk_norm), "BIAS": yn(c.bias),
            "N_KV_HEAD": str(c.n_kv_head), "MOE": yn(c.moe is not None), "ATTN_WINDOW": str(c.attn_window),
            "ATTN_SOFTCAP": str(c.attn_softcap), "FINAL_LOGIT_SOFTCAP": str(c.final_logit_softcap)}


# Options no target has: mixture-of-experts routing, sliding windows, soft-capping.
_COMMON = (("MOE", "n", lambda c: c.moe is None),
           ("ATTN_WINDOW", "0", lambda c: c.attn_window == 0),
           ("ATTN_SOFTCAP", "0", lambda c: not c.attn_softcap),
           ("FINAL_LOGIT_SOFTCAP", "0", lambda c: not c.final_logit_softcap))
_LLAMA_SET = (("NORM", "rmsnorm", lambda c: c.norm == "rmsnorm"),
              ("POS", "rope", lambda c: c.pos == "rope"),
              ("MLP", "swiglu", lambda c: c.mlp == "swiglu"))

TARGETS = (
    Target("GPT2LMHeadModel", "gpt2", (("NORM", "layernorm", lambda c: c.norm == "layernorm"),
                                       ("POS", "learned", lambda c: c.pos == "learned"),
                                       ("MLP", "gelu", lambda c: c.mlp == "gelu"),
                                       ("N_KV_HEAD", "N_HEAD", lambda c: c.n_kv_head == c.n_head),
                                       ("QK_NORM", "n", lambda c: not c.qk_norm)) + _COMMON),
    Target("LlamaForCausalLM", "llama", _LLAMA_SET + (("QK_NORM", "n", lambda c: not c.qk_norm),) + _COMMON),
    Target("Qwen3ForCausalLM", "qwen3", _LLAMA_SET + (("QK_NORM", "y", lambda c: c.qk_norm),
                                                      ("BIAS", "n", lambda c: not c.bias)) + _COMMON),
)


def blockers(target: Target, c: ModelConfig) -> list[str]:
    """``CONFIG_X=value (needs wanted)`` for each of the target's requirements the model misses."""
    have = _symbols(c)
    return [f"CONFIG_{sym}={have[sym]} (needs {want})" for sym, want, ok in target.needs if not ok(c)]


def choose_target(c: ModelConfig) -> Target:
    """The architecture that expresses ``c`` exactly, or ExportRefused naming the nearest one's blockers."""
    for target in TARGETS:
        if not blockers(target, c):
            return target
    ranked = sorted(TARGETS, key=lambda t: len(blockers(t, c)))
    lines = "; ".join(f"{t.architecture}: {', '.join(blockers(t, c))}" for t in ranked)
    raise ExportRefused(
        f"no Hugging Face architecture computes this model exactly, so it is not exported. Blocking symbols per "
        f"architecture, nearest first -- {lines}. Train with the nearest one's options to make it exportable "
        "(GPT-2: LayerNorm, learned positions, GELU; LLaMA: RMSNorm, RoPE, SwiGLU; Qwen3: LLaMA + QK_NORM, BIAS=n); "
        "'make sample' and our own evaluation still work on any option set")


def notes(c: ModelConfig) -> list[str]:
    """What the export leaves out that does not change next-token logits."""
    if c.mtp_heads:
        return [f"CONFIG_MTP_HEADS={c.mtp_heads}: the multi-token-prediction heads are training-only extra blocks "
                "with no Hugging Face counterpart; they are left out (next-token logits are unaffected)"]
    return []


def hf_config(target: Target, c: ModelConfig, vocab_size: int, eos_id: int, dtype: str) -> dict:
    """config.json for ``target`` (written by hand: exporting does not need transformers installed)."""
    common = {"architectures": [target.architecture], "model_type": target.model_type, "vocab_size": vocab_size,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id,
              "pad_token_id": eos_id, "dtype": dtype, "use_cache": True, "initializer_range": c.init_std}
    if target.model_type == "gpt2":
        return {**common, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                "n_head": c.n_head, "n_inner": c.mlp_hidden, "activation_function": "gelu",  # exact (erf) GELU
                "layer_norm_epsilon": LAYERNORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    config = {**common, "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
              "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": RMS_EPS,
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
              "rope_theta": c.rope_theta,  # transformers < 5 reads this key
              "attention_bias": c.bias, "attention_dropout": 0.0}
    if target.model_type == "llama":
        return {**config, "mlp_bias": c.bias, "pretraining_tp": 1}
    return {**config, "use_sliding_window": False, "sliding_window": None}


def hf_weights(target: Target, c: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (trunk only) under ``target``'s names, contiguous and unshared (safetensors)."""
    mapped = _gpt2(c, ours) if target.model_type == "gpt2" else _llama(c, ours)
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in mapped.items()}


def _gpt2(c: ModelConfig, w: dict) -> dict:
    def linear(ours: str, hf: str) -> dict:  # Conv1D: weight (in, out), always a bias
        weight = w[f"{ours}.weight"]
        bias = w.get(f"{ours}.bias", torch.zeros(weight.size(0), dtype=weight.dtype))
        return {f"{hf}.weight": weight.t(), f"{hf}.bias": bias}

    def norm(ours: str, hf: str) -> dict:
        weight = w[f"{ours}.weight"]
        return {f"{hf}.weight": weight, f"{hf}.bias": w.get(f"{ours}.bias", torch.zeros_like(weight))}

    out = {"transformer.wte.weight": w["wte.weight"], "transformer.wpe.weight": w["wpe.weight"],
           **norm("ln_f", "transformer.ln_f")}
    for i in range(c.n_layer):
        b, h = f"blocks.{i}", f"transformer.h.{i}"
        out |= norm(f"{b}.ln_1", f"{h}.ln_1") | norm(f"{b}.ln_2", f"{h}.ln_2")
        out |= linear(f"{b}.attn.c_attn", f"{h}.attn.c_attn") | linear(f"{b}.attn.c_proj", f"{h}.attn.c_proj")
        out |= linear(f"{b}.mlp.c_fc", f"{h}.mlp.c_fc") | linear(f"{b}.mlp.c_proj", f"{h}.mlp.c_proj")
    if not c.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def _llama(c: ModelConfig, w: dict) -> dict:
    def split(ours: str, hf: list[str], sizes: list[int]) -> dict:
        parts = {}
        for suffix in ("weight", "bias") if c.bias else ("weight",):
            for name, t in zip(hf, w[f"{ours}.{suffix}"].split(sizes, dim=0)):
                parts[f"{name}.{suffix}"] = t
        return parts

    kv = c.n_kv_head * c.head_dim
    out = {"model.embed_tokens.weight": w["wte.weight"], "model.norm.weight": w["ln_f.weight"]}
    for i in range(c.n_layer):
        b, h = f"blocks.{i}", f"model.layers.{i}"
        a = f"{h}.self_attn"
        out |= {f"{h}.input_layernorm.weight": w[f"{b}.ln_1.weight"],
                f"{h}.post_attention_layernorm.weight": w[f"{b}.ln_2.weight"]}
        out |= split(f"{b}.attn.c_attn", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], [c.n_embd, kv, kv])
        out |= split(f"{b}.attn.c_proj", [f"{a}.o_proj"], [c.n_embd])
        out |= split(f"{b}.mlp.c_fc", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], [c.mlp_hidden, c.mlp_hidden])
        out |= split(f"{b}.mlp.c_proj", [f"{h}.mlp.down_proj"], [c.n_embd])
        if c.qk_norm:
            out |= {f"{a}.q_norm.weight": w[f"{b}.attn.q_norm.weight"], f"{a}.k_norm.weight": w[f"{b}.attn.k_norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out
