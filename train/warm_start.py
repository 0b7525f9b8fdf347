"""Warm starts (CONFIG_INIT_FROM): a parent's weights into a freshly built model, before anything wraps it.

The parent is a run directory (its best or latest checkpoint), a checkpoint file or folder (a sharded
FSDP2/DeepSpeed one's weights gathered; a LoRA run's adapter merged into its own base), or a Hugging
Face folder (train/hf_parent.py). Its tokenizer must be this run's, or this run's before a chat
template added special tokens (then the parent's embedding fills the first rows). Each mismatch is a
named CheckpointError listing what differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from data.stream import file_sha256
from data.tokenizer import Tokenizer
from parallel.errors import CheckpointError
from train import checkpoint
from train.hf_parent import hf_parent, is_hf_folder, with_new_rows
from train.lora import checkpoint_weights
from train.state import incompatibilities, shape_mismatches


def load_parent(where: Path, which: str | None, model: torch.nn.Module, tokenizer: Tokenizer, cfg,
                carry_optimizer: bool, log=print, base_tokenizer: Tokenizer | None = None) -> tuple[dict, dict | None]:
    """CONFIG_INIT_FROM's weights into ``model`` (a plain GPT): a run directory's best or latest checkpoint,
    a checkpoint file, or a Hugging Face folder. Returns (the parent record for summary.json, the checkpoint
    state when its optimizer state is to be carried, else None); each mismatch is a named CheckpointError.

    ``base_tokenizer``: this run's tokenizer before a chat template added its special tokens. A parent
    trained with it is accepted too; its smaller embedding fills the first rows (the new tokens' rows
    keep their initialisation), and the record says how many rows the parent had."""
    if is_hf_folder(where):  # weights only, through hf/'s reverse mapping
        try:
            weights, parent = hf_parent(where, model, tokenizer, carry_optimizer, log)
        except CheckpointError:
            if base_tokenizer is None or base_tokenizer.sha256 == tokenizer.sha256:
                raise
            weights, parent = hf_parent(where, model, base_tokenizer, carry_optimizer, log, grow=True)
        model.load_state_dict(weights)
        return parent, None
    path, state = checkpoint.init_source(where, which)
    parent_tokenizer = Tokenizer(state["tokenizer"])
    grow = base_tokenizer is not None and parent_tokenizer.sha256 == base_tokenizer.sha256
    if parent_tokenizer.sha256 != tokenizer.sha256 and not grow:
        raise CheckpointError(f"CONFIG_INIT_FROM: {path} was trained with another tokenizer ({parent_tokenizer.kind}, "
                              f"sha256 {parent_tokenizer.sha256[:12]}) than this run's ({tokenizer.kind}, "
                              f"sha256 {tokenizer.sha256[:12]}); use the parent's tokenizer settings "
                              "(TOKENIZER, VOCAB_SIZE, its data for a char vocabulary)")
    weights, rows = with_new_rows(checkpoint_weights(state), model.state_dict()) if grow else (
        checkpoint_weights(state), None)
    mismatched = shape_mismatches(weights, model.state_dict())
    if mismatched:
        differing = incompatibilities(state["config"], cfg)
        raise CheckpointError(f"CONFIG_INIT_FROM: the weights of {path} do not fit this model: "
                              + "; ".join(mismatched) + ". Model symbols that differ: "
                              + ("; ".join(differing) or "none") + ". Set them as in the parent run")
    model.load_state_dict(weights)
    if rows is not None:
        log(f"warm start: the parent's {rows} embedding rows fill the first of this model's {model.config.vocab_size} "
            "(the added special tokens' rows are new)")
    parent = {"path": str(path), "kind": "checkpoint", "step": state["step"], "weights_sha256": checkpoint_sha256(path),
              "val_loss": state["val_loss"], "optimizer": carry_optimizer,
              **({"embedding_rows": rows} if rows is not None else {})}
    return parent, state if carry_optimizer else None


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, or of a sharded checkpoint folder's files (sorted by name) as one stream."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as stream:
            while chunk := stream.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()
