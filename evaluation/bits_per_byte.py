"""Bits per byte of a checkpoint on each validation set: one pass over its tokens in BLOCK_SIZE windows.

Training estimates bits per byte from EVAL_ITERS random batches; this is the pass over the first
EVAL_BPB_TOKENS tokens of every validation set (all of them at 0), each token predicted once from
the window it falls in, and the bytes are those exact tokens' UTF-8 bytes. It does not depend on
the tokenizer, so char, byte, SentencePiece and BPE runs compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from data.cache import PreparedData, token_byte_lengths
from data.mix import PreparedMix


def validation_sets(data: PreparedData | PreparedMix) -> dict[str, PreparedData]:
    """Name -> prepared data of every validation set training reports (the val split of each)."""
    if isinstance(data, PreparedData):
        return {"val": data}
    names = data.names if data.named else ["val"]
    return {**{name: m.data for name, m in zip(names, data.members)}, **dict(data.extras)}


@torch.no_grad()
def bits_per_byte(model, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int = 16,
                  device: str | torch.device = "cpu") -> dict:
    """{"bpb", "tokens", "bytes", "nats_per_token"} of ``tokens`` under ``model``."""
    block = model.config.block_size
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    starts = list(range(0, len(ids) - 1, block))
    total_nats, scored = 0.0, 0
    for first in range(0, len(starts), batch_size):
        rows = [ids[s:s + block + 1] for s in starts[first:first + batch_size]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)  # -100: no target (a short last window)
        for i, r in enumerate(rows):
            x[i, :len(r) - 1], y[i, :len(r) - 1] = r[:-1], r[1:]
        logits, _ = model(x.to(device), every_position=True)
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                      reduction="sum").item()
        scored += int((y != -100).sum())
    predicted_bytes = int(byte_lengths[ids[1:scored + 1].numpy()].sum())
    return {"bpb": total_nats / math.log(2) / predicted_bytes if predicted_bytes else None, "tokens": scored,
            "bytes": predicted_bytes, "nats_per_token": total_nats / scored if scored else None}


def validation_bpb(model, data: PreparedData | PreparedMix, max_tokens: int, batch_size: int,
                   device: str | torch.device = "cpu") -> dict[str, dict]:
    """Each validation set's bits_per_byte over its first ``max_tokens`` tokens (0: all)."""
    out = {}
    for name, prepared in validation_sets(data).items():
        lengths = token_byte_lengths(prepared.tokenizer)
        if lengths is None:
            continue
        tokens = prepared.tokens("val")
        out[name] = bits_per_byte(model, tokens[:max_tokens + 1] if max_tokens else tokens, lengths, batch_size, device)
    return out
