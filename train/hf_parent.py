"""A Hugging Face folder as a warm start's parent (CONFIG_INIT_FROM naming one): its weights as this run's.

A folder with config.json and model.safetensors (or model.safetensors.index.json and its shards)
is read through hf/read.py, the export mapping traced backwards: safetensors and JSON only,
nothing unpickled. What it must satisfy, each refusal named:

- weights only: it holds no optimizer state, so CONFIG_INIT_FROM_OPTIMIZER is refused;
- the architecture and settings our model computes (hf/read.py's ImportRefused names the setting);
- the tokenizer: the folder's tokenizer.json must be the very one this run's tokenizer exports to
  (compared as canonical JSON). A folder without one, or with another tokenizer (a foreign model's,
  or another run's), is refused: ids would mean other strings;
- shapes: the same listing as a checkpoint's mismatch, with the settings that differ as symbols.

The export adds tensors our model may lack: zero biases (GPT-2 always has them; ours with
CONFIG_BIAS=n does not) and zero embedding rows past a byte vocabulary (room for end-of-text).
Those all-zero extras are dropped again, so an export reads back to the exact weights it came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from hf.architectures import ExportRefused
from hf.read import read_hf_folder
from hf.tokenizer import tokenizer_files
from model.gpt import ModelConfig
from parallel.errors import CheckpointError
from train.build import padded_vocab
from train.state import shape_mismatches

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# ModelConfig fields an HF config.json fixes, and the symbol that sets each in our configuration
ARCHITECTURE_SYMBOLS = {"block_size": "BLOCK_SIZE", "n_layer": "N_LAYER", "n_head": "N_HEAD",
                        "n_kv_head": "N_KV_HEAD", "n_embd": "N_EMBD", "norm": "NORM", "pos": "POS",
                        "rope_theta": "ROPE_THETA", "mlp": "MLP", "mlp_hidden": "MLP_RATIO", "qk_norm": "QK_NORM",
                        "bias": "BIAS", "tie_embeddings": "TIE_EMBEDDINGS", "vocab_size": "TOKENIZER"}


def is_hf_folder(where: Path) -> bool:
    """A Hugging Face model folder: config.json beside safetensors weights (one file or an index)."""
    return (where / "config.json").is_file() and any((where / name).is_file() for name in WEIGHT_FILES)


def hf_parent(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer, carry_optimizer: bool,
              log=print, grow: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict that loads into ``model``, the parent record for summary.json) of an HF folder."""
    if carry_optimizer:
        raise CheckpointError(f"CONFIG_INIT_FROM_OPTIMIZER is set but CONFIG_INIT_FROM={str(folder)!r} is a Hugging "
                              "Face folder, which holds weights only (no optimizer state); unset INIT_FROM_OPTIMIZER")
    check_tokenizer(folder, tokenizer, model.config.block_size)
    config, weights = read_hf_folder(folder)
    current = model.state_dict()
    weights, dropped = without_export_fill(weights, current)
    rows = None
    if grow:  # the folder has this run's base tokenizer: a chat template added tokens (new embedding rows)
        weights, rows = with_new_rows(base_rows(weights, padded_vocab(tokenizer.vocab_size)), current)
    if dropped:
        log(f"warm start: dropped the export's all-zero fill ({', '.join(dropped[:3])}"
            + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "") + ")")
    mismatched = shape_mismatches(weights, current)
    if mismatched:
        differing = differences(config, model.config)
        raise CheckpointError(f"CONFIG_INIT_FROM: the weights of the Hugging Face folder {folder} do not fit this "
                              "model: " + "; ".join(mismatched) + ". Settings that differ: "
                              + ("; ".join(differing) or "none") + ". Set them as the folder's config.json has them")
    if rows is not None:
        log(f"warm start: the folder's {rows} embedding rows fill the first of this model's "
            f"{model.config.vocab_size} (the added special tokens' rows are new)")
    return weights, {"path": str(folder), "kind": "hf", "step": None, "weights_sha256": weights_sha256(folder),
                     "val_loss": None, "optimizer": False, **({"embedding_rows": rows} if rows is not None else {})}


def check_tokenizer(folder: Path, tokenizer: Tokenizer, block_size: int) -> None:
    """The folder's tokenizer.json must be the one this run's tokenizer exports to, else a named error."""
    theirs = folder / "tokenizer.json"
    what_to_do = ("a warm start from a Hugging Face folder needs this run's own tokenizer: point INIT_FROM at a "
                  "'make export' folder of a run with the same tokenizer settings (TOKENIZER, VOCAB_SIZE, its data "
                  "for a char vocabulary), or at that run's directory")
    if not theirs.is_file():
        raise CheckpointError(f"CONFIG_INIT_FROM: {folder} holds no tokenizer.json, so nothing says its ids mean this "
                              f"run's tokens; {what_to_do}")
    try:
        ours = tokenizer_files(tokenizer, block_size)["tokenizer.json"]
    except ExportRefused as e:
        raise CheckpointError(f"CONFIG_INIT_FROM: {folder} is a Hugging Face folder, and this run's tokenizer has no "
                              f"tokenizer.json to compare its tokenizer with ({e})") from None
    if canonical(theirs.read_text(encoding="utf-8")) != canonical(ours):
        raise CheckpointError(f"CONFIG_INIT_FROM: the tokenizers differ: {theirs} is not the tokenizer.json this run's "
                              f"tokenizer ({tokenizer.kind}, sha256 {tokenizer.sha256[:12]}) exports to; {what_to_do}")


def canonical(tokenizer_json: str) -> str:
    """tokenizer.json text in one spelling: re-serialised by the tokenizers library, keys sorted."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        text = HFTokenizer.from_str(tokenizer_json).to_str()
    except Exception:  # noqa: BLE001 - not a tokenizer this library reads: compare the JSON as written
        text = tokenizer_json
    return json.dumps(json.loads(text), sort_keys=True)


def without_export_fill(weights: dict[str, torch.Tensor], current: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``weights`` less what the export adds: all-zero tensors the model lacks (GPT-2's biases for BIAS=n)
    and all-zero embedding/head rows past the model's vocabulary (a byte vocabulary's end-of-text room)."""
    out, dropped = {}, []
    for name, tensor in weights.items():
        if name not in current:
            if not tensor.any():
                dropped.append(name)
                continue
        elif name in ("wte.weight", "lm_head.weight") and tensor.size(0) > current[name].size(0):
            rows = current[name].size(0)
            if not tensor[rows:].any() and tensor.shape[1:] == current[name].shape[1:]:
                dropped.append(f"{name} rows {rows}..{tensor.size(0) - 1}")
                tensor = tensor[:rows]
        out[name] = tensor
    return out, dropped


def differences(folder: ModelConfig, ours: ModelConfig) -> list[str]:
    """``CONFIG_X: folder a, configuration b`` for each architecture setting the two disagree on."""
    out = []
    for field, symbol in ARCHITECTURE_SYMBOLS.items():
        theirs, mine = getattr(folder, field), getattr(ours, field)
        if theirs != mine:
            what = {"mlp_hidden": " (MLP width)", "vocab_size": " (padded vocabulary)"}.get(field, "")
            out.append(f"CONFIG_{symbol}{what}: folder {theirs!r}, configuration {mine!r}")
    return out


def weights_sha256(folder: Path) -> str:
    """SHA-256 of the weights: model.safetensors, or the shards its index names, in order, as one stream."""
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    h = hashlib.sha256()
    for name in files:
        with open(folder / name, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def base_rows(weights: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The embedding (and untied head) cut to the base model's ``rows`` where the rows past them are the
    export's all-zero room for end-of-text (a byte vocabulary's), so the added tokens' rows start fresh."""
    out = dict(weights)
    for name in ("wte.weight", "lm_head.weight"):
        w = weights.get(name)
        if w is not None and w.size(0) > rows and not w[rows:].any():
            out[name] = w[:rows]
    return out


def with_new_rows(weights: dict[str, torch.Tensor], current: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], int | None]:
    """``weights`` whose embedding (and untied head) has fewer rows than ``current``'s, completed with
    ``current``'s extra rows (a grown vocabulary's initialised rows); (weights, the parent's rows or None)."""
    out, rows = dict(weights), None
    for name in ("wte.weight", "lm_head.weight"):
        theirs, ours = weights.get(name), current.get(name)
        if theirs is not None and ours is not None and theirs.size(0) < ours.size(0) \
                and theirs.shape[1:] == ours.shape[1:]:
            rows = theirs.size(0)
            out[name] = torch.cat([theirs.to(ours.dtype), ours[rows:].detach().cpu().to(ours.dtype)])
    return out, rows
