"""LoRA (CONFIG_LORA) on our GPT through peft: adapters on named Linear layers, the base frozen.

``apply_lora`` puts peft's LoRA layers (``peft.inject_adapter_in_model``) on every Linear whose name
ends with one of LORA_TARGETS (``attn.c_attn`` matches ``blocks.<i>.attn.c_attn``): each keeps
its original Linear as ``base_layer`` and adds ``lora_A`` (rank x in) and ``lora_B`` (out x rank,
zero at first), so its output is ``W x + (alpha / rank) * B A dropout(x)``. Every other parameter is
frozen; with LORA_BASE_BF16 the frozen ones are held in bf16 while the adapters stay fp32.

Names. Our state dict with adapters is the plain one with ``<layer>.weight`` moved to
``<layer>.base_layer.weight`` and the adapters under ``<layer>.lora_A.default.weight``; the adapter
state this module saves and loads uses peft's saved names, ``<layer>.lora_A.weight`` and
``<layer>.lora_B.weight``. ``lora_checkpoint_weights`` gives the plain state dict again (adapters added into
the weights, fp32), which loads into a GPT without LoRA: for export and for a later stage's
INIT_FROM.

A LoRA checkpoint keeps the adapter apart from the base: its "model" slot holds ``adapter_state``
(plus any plain parameter the run changed and named in ``extra``, such as an embedding grown for
chat-template tokens), its "lora" entry the settings (``LoraSettings.to_dict``), and the trainer
records where the base weights came from (INIT_FROM and their SHA-256). ``lora_checkpoint_weights``
rebuilds the full merged weights from that state and the base's plain weights, without peft;
``checkpoint_weights`` finds those base weights through the recorded parent (a checkpoint file or an
HF folder, its SHA-256 checked; a LoRA parent merged in turn), for 'make export' and 'make eval'.

peft is imported inside the functions that need it: importing it loads transformers (seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn

from data.stream import file_sha256
from hf.read import read_hf_folder
from kconfig.errors import NamedError
from model.gpt import GPT, ModelConfig
from model.moe import MoE
from parallel.errors import CheckpointError
from train import checkpoint
from train.hf_parent import is_hf_folder, weights_sha256, without_export_fill

ADAPTER = "default"  # peft's adapter name; ours is always the one
ADAPTER_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>[AB])\.weight$")


class LoraError(NamedError, ValueError):
    """A LoRA setting or adapter state that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")  # suffixes of our Linear layers' names
    base_bf16: bool = False

    def __post_init__(self):
        if self.rank < 1 or self.alpha < 1:
            raise LoraError(f"CONFIG_LORA_RANK={self.rank} and CONFIG_LORA_ALPHA={self.alpha} must be >= 1")
        if not self.targets:
            raise LoraError("CONFIG_LORA_TARGETS is empty: name at least one Linear layer, e.g. 'attn.c_attn'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> "LoraSettings | None":
        """The settings of a run with CONFIG_LORA=y; None with LoRA off (full fine-tuning, pretraining)."""
        if not cfg.LORA:
            return None
        return cls(rank=cfg.LORA_RANK, alpha=cfg.LORA_ALPHA, dropout=cfg.LORA_DROPOUT,
                   targets=tuple(cfg.LORA_TARGETS.split()), base_bf16=cfg.LORA_BASE_BF16)

    def to_dict(self) -> dict:
        """Plain values for a checkpoint's "lora" entry (weights-only loadable)."""
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, saved: dict) -> "LoraSettings":
        return cls(**{**saved, "targets": tuple(saved["targets"])})


def adaptable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers an adapter can go on: all but MoE routers, whose weight the MoE layer
    applies itself (in fp32, model/moe.py's router_logits) without calling the Linear."""
    routers = {f"{name}.router" for name, m in model.named_modules() if isinstance(m, MoE)}
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and name not in routers]


def linear_names(model: nn.Module) -> list[str]:
    """adaptable_linears with block numbers as <i> (attn.c_attn shows as blocks.<i>.attn.c_attn)."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".<i>.", name) for name in adaptable_linears(model)))


def matching_modules(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Names of the Linear layers LORA_TARGETS selects; a target matching none is a LoraError."""
    linears = adaptable_linears(model)
    matched, unmatched = [], []
    for target in settings.targets:
        found = [name for name in linears if name == target or name.endswith("." + target)]
        (matched.extend(found) if found else unmatched.append(target))
    if unmatched:
        raise LoraError(f"CONFIG_LORA_TARGETS: {', '.join(repr(t) for t in unmatched)} matches no Linear layer of "
                        f"this model; its Linear layers are {', '.join(linear_names(model))} (name a suffix, "
                        "e.g. attn.c_attn or mlp.c_fc; an MoE router takes none)")
    matched = list(dict.fromkeys(matched))
    if "lm_head" in matched and model.config.tie_embeddings:
        raise LoraError("CONFIG_LORA_TARGETS names lm_head, whose weight is the token embedding "
                        "(CONFIG_TIE_EMBEDDINGS=y): merging an adapter into it would change the embedding too; "
                        "leave lm_head out or fine-tune a model with untied embeddings")
    return matched


def apply_lora(model: nn.Module, settings: LoraSettings, also_train: tuple[str, ...] = ()) -> list[str]:
    """Put LoRA adapters on the LORA_TARGETS layers of ``model`` (in place), freeze everything else
    (in bf16 with base_bf16) but the plain parameters named in ``also_train``, trained in full (an
    embedding grown for new tokens, whose new rows would otherwise stay at their random init; save
    them with ``adapter_state(model, extra=also_train)``). With base_bf16 those are bf16 too: they
    sit in the base's forward, which then runs in bf16 throughout. Returns the names of the layers
    that got an adapter."""
    from peft import LoraConfig, inject_adapter_in_model

    matched = matching_modules(model, settings)
    unknown = [name for name in also_train if name not in dict(model.named_parameters())]
    if unknown:
        raise LoraError(f"apply_lora: {', '.join(unknown)} is no parameter of the model (also_train names plain "
                        "parameters, e.g. wte.weight)")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=matched, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        adapter = ".lora_" in name
        p.requires_grad_(adapter or name in also_train)
        if settings.base_bf16 and not adapter and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return matched


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> peft LoRA layer (its ``base_layer`` is our Linear)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes its base alone (every adapter off): DPO's reference model
    without a second copy of the weights. The adapters are trainable again on leaving it."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_state(model: nn.Module, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapters' tensors (``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``), detached, plus the
    plain parameters named in ``extra`` (their plain names, e.g. wte.weight grown for a template's tokens)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}
    plain = dict(model.named_parameters())
    for name in extra:
        if name not in plain:
            raise LoraError(f"adapter_state: {name!r} is not a plain parameter of the model")
        state[name] = plain[name].detach()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``adapter_state``'s output into a model apply_lora prepared with the same settings."""
    from peft import set_peft_model_state_dict

    adapters = {k: v for k, v in state.items() if ADAPTER_KEY.match(k)}
    expected = set(adapter_state(model))
    if set(adapters) != expected:
        missing, unknown = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise LoraError("the adapter state does not fit this model's LoRA layers (CONFIG_LORA_TARGETS): "
                        + (f"missing {', '.join(missing[:4])}" if missing else "")
                        + ("; " if missing and unknown else "") + (f"unknown {', '.join(unknown[:4])}" if unknown else "")
                        + "; resume with the LoRA settings the checkpoint was trained with")
    set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER)
    plain = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in adapters:
                if name not in plain or plain[name].shape != tensor.shape:
                    raise LoraError(f"the adapter state's {name!r} fits no parameter of this model")
                plain[name].copy_(tensor)


def lora_checkpoint_weights(state: dict, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full merged weights of a LoRA checkpoint ``state`` ("model": adapter_state, "lora": settings)
    over ``base_weights``, the base's plain state dict (what INIT_FROM loaded); plain entries of the
    checkpoint (adapter_state's ``extra``) replace the base's. Floating tensors come back fp32."""
    settings = LoraSettings.from_dict(state["lora"])
    merged = {k: v.float() if v.is_floating_point() else v for k, v in base_weights.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state["model"].items():
        m = ADAPTER_KEY.match(key)
        if m:
            pairs.setdefault(m["layer"], {})[m["part"]] = tensor.float()
        else:
            merged[key] = tensor.float() if tensor.is_floating_point() else tensor
    for layer, ab in pairs.items():
        name = f"{layer}.weight"
        if name not in merged or set(ab) != {"A", "B"}:
            raise LoraError(f"the LoRA checkpoint's adapter {layer!r} has no base weight {name!r} (or lacks "
                            "lora_A/lora_B): the base weights are not the ones it was trained on; check INIT_FROM")
        delta = (ab["B"] @ ab["A"]) * settings.scaling
        if delta.shape != merged[name].shape:
            raise LoraError(f"the LoRA adapter of {layer!r} is {tuple(delta.shape)}, its base weight "
                            f"{tuple(merged[name].shape)}: the base is not the one it was trained on; check INIT_FROM")
        merged[name] = merged[name] + delta
    if "model_config" in state:
        saved = state["model_config"]
        if saved["tie_embeddings"] and "lm_head.weight" in merged:
            merged["lm_head.weight"] = merged["wte.weight"]  # a tied head is the (possibly grown) embedding
        if "wte.weight" in merged and merged["wte.weight"].size(0) != saved["vocab_size"]:
            raise LoraError(f"this LoRA checkpoint's model has a vocabulary of {saved['vocab_size']} but its base "
                            f"{merged['wte.weight'].size(0)}, and the checkpoint holds no grown wte.weight: save a "
                            "grown embedding with the adapter (adapter_state's extra)")
    return merged


def checkpoint_weights(state: dict) -> dict[str, torch.Tensor]:
    """A checkpoint state's plain model weights, whoever reads them (warm starts, export, eval, sample): its
    "model" slot, a sharded (FSDP2/DeepSpeed) checkpoint's weights gathered into one state dict, or for a
    LoRA run the adapter merged into its base (base_weights of its "init_from" record)."""
    if state.get("sharded"):
        if "lora" in state:
            raise CheckpointError(f"{state['sharded']}: a sharded LoRA checkpoint; merging its adapter needs a "
                                  "single-file one (train the LoRA stage with PARALLEL_NONE or DDP)")
        from parallel.runtime import full_weights

        return full_weights(state["sharded"], state["engine"])
    if "lora" not in state:
        return state["model"]
    return lora_checkpoint_weights(state, base_weights(state.get("init_from"),
                                                       ModelConfig.from_dict(state["model_config"])))


def base_weights(parent: dict | None, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain weights a LoRA run started from, read again from its parent record (the trainer's
    INIT_FROM record: path, kind "checkpoint" or "hf", weights_sha256), which must still hold the very
    bytes it trained on; a parent that is itself a LoRA run is merged first."""
    if not parent:
        raise CheckpointError("this LoRA checkpoint records no base weights (no init_from): its adapter cannot be "
                              "merged; export a checkpoint written by a LoRA run that started from INIT_FROM")
    where = Path(parent["path"])
    found = is_hf_folder(where) if parent["kind"] == "hf" else where.is_file()
    if not found:
        raise CheckpointError(f"the base weights of this LoRA checkpoint, {where} (its INIT_FROM), are gone: "
                              "the adapter cannot be merged without them; restore them there")
    sha = weights_sha256(where) if parent["kind"] == "hf" else file_sha256(where)
    if parent["weights_sha256"] and sha != parent["weights_sha256"]:
        raise CheckpointError(f"the base weights of this LoRA checkpoint, {where}, changed since it trained (sha256 "
                              f"{sha[:12]}, recorded {parent['weights_sha256'][:12]}): merging the adapter into "
                              "other weights would be wrong; restore the original base there")
    if parent["kind"] == "hf":
        _, weights = read_hf_folder(where)
        with torch.device("meta"):  # shapes only; any kernel will do (flash-attn needs a GPU to build)
            shapes = GPT(dataclasses.replace(config, attn="reference")).state_dict()
        return without_export_fill(weights, shapes)[0]
    return checkpoint_weights(checkpoint.load(where))
