"""The reverse of the export: a Hugging Face folder of a mapped architecture as our ModelConfig and weights.

The weight mapping is hf/architectures.py's own, inverted by tracing rather than written a
second time: each of our tensors is filled with the distinct positions 1..N (float64, exact up to
2**53), pushed through ``hf_weights``, and every element of each Hugging Face tensor then says
which of our elements it is (0: a zero bias the export adds for BIAS=n). Reading never unpickles:
config JSON and safetensors only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hf.architectures import LAYERNORM_EPS, RMS_EPS, TARGETS, ExportRefused, choose_target, hf_weights
from model.gpt import GPT, ModelConfig


class ImportRefused(ExportRefused):
    """A Hugging Face folder whose architecture or settings our model cannot compute exactly."""


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) of an HF folder holding GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_config = model_config_of(config, folder)
    return model_config, our_weights(model_config, read_safetensors(folder))


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors |= load_file(str(folder / name))
    return tensors


def model_config_of(hf: dict, where: Path) -> ModelConfig:
    """Our ModelConfig for an HF config.json, or ImportRefused naming the setting we cannot express."""
    kind = hf.get("model_type")
    if kind not in {t.model_type for t in TARGETS}:
        raise ImportRefused(f"{where}/config.json: model_type {kind!r} is not one of the mapped architectures "
                            f"({', '.join(t.architecture for t in TARGETS)})")
    common = {"vocab_size": hf["vocab_size"], "tie_embeddings": hf.get("tie_word_embeddings", True),
              "init_std": hf.get("initializer_range", 0.02)}
    if kind == "gpt2":
        _require(where, hf, "activation_function", "gelu", "exact (erf) GELU, CONFIG_MLP=gelu; gelu_new is tanh GELU")
        _require(where, hf, "layer_norm_epsilon", LAYERNORM_EPS, "nn.LayerNorm's eps")
        n_embd = hf["n_embd"]
        hidden = hf.get("n_inner") or 4 * n_embd
        config = ModelConfig(**common, block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                             n_kv_head=hf["n_head"], n_embd=n_embd, mlp_ratio=hidden / n_embd, bias=True)
    else:
        _require(where, hf, "hidden_act", "silu", "SwiGLU, CONFIG_MLP=swiglu")
        _require(where, hf, "rms_norm_eps", RMS_EPS, "our RMSNorm's eps")
        rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        _require(where, rope, "rope_type", "default", "plain RoPE (no scaling)")
        if hf.get("use_sliding_window"):
            raise ImportRefused(f"{where}/config.json: use_sliding_window is set; only full attention is mapped")
        bias = hf.get("attention_bias", False)
        if kind == "llama" and hf.get("mlp_bias", False) != bias:
            raise ImportRefused(f"{where}/config.json: attention_bias={bias} but mlp_bias={hf.get('mlp_bias')}; "
                                "CONFIG_BIAS sets both")
        n_embd, hidden = hf["hidden_size"], hf["intermediate_size"]
        config = ModelConfig(**common, block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                             n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or
                             hf["num_attention_heads"], n_embd=n_embd, norm="rmsnorm", pos="rope",
                             rope_theta=float(rope["rope_theta"]), mlp="swiglu", mlp_ratio=1.5 * hidden / n_embd,
                             qk_norm=kind == "qwen3", bias=bias)
        if hf.get("head_dim", config.head_dim) != config.head_dim:
            raise ImportRefused(f"{where}/config.json: head_dim {hf['head_dim']} differs from hidden_size / "
                                f"num_attention_heads = {config.head_dim}, which CONFIG_N_EMBD/CONFIG_N_HEAD fix")
    if config.mlp_hidden != hidden:
        raise ImportRefused(f"{where}/config.json: MLP width {hidden} is not one CONFIG_MLP_RATIO gives "
                            f"({config.mlp} at ratio {config.mlp_ratio:g} gives {config.mlp_hidden}; "
                            "a gated MLP's width is a multiple of 64)")
    if choose_target(config).model_type != kind:
        raise AssertionError(f"{where}: read as {choose_target(config).architecture}, not {kind}")
    return config


def _require(where: Path, hf: dict, key: str, want, what: str) -> None:
    have = hf.get(key, want)
    if have != want and not (isinstance(want, float) and isinstance(have, float) and math.isclose(have, want)):
        raise ImportRefused(f"{where}/config.json: {key}={have!r}, but our model computes {key}={want!r} ({what})")


def our_weights(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from the HF tensors, through the export mapping traced backwards."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in GPT(config).state_dict().items()}
    names = [n for n in shapes if not (config.tie_embeddings and n == "lm_head.weight")]
    positions, start = {}, 1
    for name in names:
        count = math.prod(shapes[name])
        positions[name] = torch.arange(start, start + count, dtype=torch.float64).view(shapes[name])
        start += count
    traced = hf_weights(choose_target(config), config, positions)
    missing = sorted(set(traced) - set(hf))
    if missing:
        raise ImportRefused(f"the folder lacks {len(missing)} tensors its config implies: {', '.join(missing[:5])}")
    flat = torch.zeros(start - 1, dtype=next(iter(hf.values())).dtype)
    for name, source in traced.items():
        source, values = source.flatten().long(), hf[name].flatten()
        if source.shape != values.shape:
            raise ImportRefused(f"tensor {name}: {tuple(hf[name].shape)} elements, the config implies "
                                f"{tuple(traced[name].shape)}")
        flat[source[source > 0] - 1] = values[source > 0].to(flat.dtype)
    ours, offset = {}, 0
    for name in names:
        count = math.prod(shapes[name])
        ours[name] = flat[offset:offset + count].view(shapes[name]).clone()
        offset += count
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    return ours
