"""Preference pairs for DPO: DPO_DATA's prompt/chosen/rejected rows (the TRL column names), tokenized.

Each response is rendered with CHAT_TEMPLATE as the assistant's answer to the prompt as a user
turn, so the two sequences of a pair share their prompt tokens and differ in the response (and its
closing token), which is all the loss and the log-probabilities are taken over. The last
SFT_VAL_FRACTION of the rows (file order, at least one) is held out for validation.

``PairBatches.next() -> (x, y)``, both (2B, block_size): rows 0..B-1 the chosen sequences,
B..2B-1 the rejected ones of the same pairs, y = -100 on prompt and padding; one pair per row
pair, padded with the template's closing token, pairs in a permutation seeded by (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from data.chat_template import render, stop_token
from data.errors import DataError
from data.records import read_records
from data.sft import Example, encode_segments, fit_length, require_template_tokens, split_rows
from data.sft_batches import EpochBatches, row_arrays, to_device
from data.tokenizer import Tokenizer

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceConfig:
    """The DPO data symbols (defaults equal Kconfig's)."""
    data: str = ""
    val_fraction: float = 0.05
    template: str = "chatml"
    truncate: bool = False

    @classmethod
    def from_config(cls, cfg) -> "PreferenceConfig":
        return cls(cfg.DPO_DATA, cfg.SFT_VAL_FRACTION, cfg.CHAT_TEMPLATE, cfg.SFT_TRUNCATE)


class Pair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    where: str  # file:line or file row N


class TokenPair(NamedTuple):
    chosen: Example
    rejected: Example
    where: str


def load_pairs(cfg, root: Path) -> list[Pair]:
    """Every DPO_DATA row as a Pair; a row missing a column, or with a non-string or empty one, is an error."""
    return read_pairs(PreferenceConfig.from_config(cfg).data, root)


def read_pairs(setting: str, root: Path) -> list[Pair]:
    pairs = []
    for row, where in read_records(setting, root, "CONFIG_DPO_DATA"):
        values = []
        for column in COLUMNS:
            value = row.get(column)
            if value is None:
                raise DataError(f"{where}: missing column {column!r} (DPO rows need {', '.join(COLUMNS)}; its "
                                f"columns are {sorted(row)[:10]}); fix or remove the row")
            if not isinstance(value, str):
                raise DataError(f"{where}: column {column!r} is a {type(value).__name__}, not a string (the "
                                "conversational TRL format is not read); fix or remove the row")
            if column != "prompt" and not value.strip():
                raise DataError(f"{where}: column {column!r} is empty; fix or remove the row")
            values.append(value)
        pairs.append(Pair(*values, where))
    return pairs


def tokenize_pair(pair: Pair, tokenizer: Tokenizer, template: str) -> tuple[Example, Example]:
    def one(response: str) -> Example:
        ids, mask = encode_segments(render([("user", pair.prompt), ("assistant", response)], template), tokenizer,
                                    pair.where)
        return Example(ids, mask, pair.where)

    return one(pair.chosen), one(pair.rejected)


@dataclass
class PreferenceData:
    """Tokenized pairs: ``train`` and ``val``, ``stats`` (logged once), the padding id."""
    train: list[TokenPair]
    val: list[TokenPair]
    stats: dict
    pad_id: int
    config: PreferenceConfig

    @classmethod
    def from_config(cls, cfg, tokenizer: Tokenizer, block_size: int, root: Path,
                    log: Callable[[str], None] = print) -> "PreferenceData":
        c = PreferenceConfig.from_config(cfg)
        require_template_tokens(tokenizer, c.template)
        pairs, truncated, dropped = [], 0, 0
        for pair in read_pairs(c.data, root):
            chosen, rejected = tokenize_pair(pair, tokenizer, c.template)
            cut = []
            for e in (chosen, rejected):
                ids, mask, was_cut = fit_length(e.ids, e.mask, block_size, c.truncate, pair.where, "CONFIG_DPO_DATA")
                cut.append((Example(ids, mask, e.where), was_cut))
            truncated += any(was for _, was in cut)
            if not all(e.mask[1:].any() for e, _ in cut):  # cut inside the prompt: no response left
                dropped += 1
                continue
            pairs.append(TokenPair(cut[0][0], cut[1][0], pair.where))
        if len(pairs) < 2:
            raise DataError(f"CONFIG_DPO_DATA={c.data!r}: {len(pairs)} usable pair(s) ({dropped} cut to their "
                            "prompt by CONFIG_SFT_TRUNCATE); at least two are needed (training and validation)")
        n_train = split_rows(len(pairs), c.val_fraction, "CONFIG_DPO_DATA")
        train, val = pairs[:n_train], pairs[n_train:]
        stats = {"pairs": len(pairs), "train_pairs": len(train), "val_pairs": len(val),
                 "tokens": int(sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)),
                 "response_tokens": int(sum(p.chosen.mask[1:].sum() + p.rejected.mask[1:].sum() for p in pairs)),
                 "truncated": truncated, "dropped": dropped}
        log(f"dpo: {len(pairs)} pairs ({len(train)} train, {len(val)} val) from {c.data}, {stats['tokens']} tokens, "
            f"{stats['response_tokens']} response tokens, {truncated} truncated"
            + (f", {dropped} dropped (prompt over BLOCK_SIZE)" if dropped else "") + f"; template {c.template}")
        return cls(train, val, stats, tokenizer.special_id(stop_token(c.template)), c)

    def batches(self, split: str, batch_size: int, block_size: int, device, seed: int) -> "PairBatches":
        """PairBatches over the ``split`` ("train" or "val") pairs."""
        return PairBatches(self.train if split == "train" else self.val, batch_size, block_size, device, seed,
                           pad_id=self.pad_id)


class PairBatches(EpochBatches):
    """``next() -> (x, y)`` of (2B, block_size): B chosen sequences, then the B rejected ones of the same pairs."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, block_size: int, device: torch.device,
                 seed: int, pad_id: int = 0):
        if not pairs:
            raise DataError("no preference pairs to draw batches from; check CONFIG_DPO_DATA")
        for p in pairs:
            if max(len(p.chosen.ids), len(p.rejected.ids)) > block_size + 1:
                raise DataError(f"{p.where}: a response of the pair is longer than CONFIG_BLOCK_SIZE={block_size} + 1 "
                                "tokens (tokenize with this BLOCK_SIZE, or set CONFIG_SFT_TRUNCATE=y)")
        self.pairs = list(pairs)
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.seed, self.pad_id = seed, pad_id
        self.reset()

    def _epoch_items(self, epoch: int) -> list[int]:
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))]

    def next(self, batch_size: int | None = None, seq_len: int | None = None):
        """This rank's (x, y): (2 * batch_size, block_size) int64 tensors, chosen rows first."""
        if seq_len not in (None, self.block_size):
            raise DataError(f"DPO batches are whole pairs of up to CONFIG_BLOCK_SIZE={self.block_size} tokens; a "
                            f"sequence length of {seq_len} (a curriculum stage) is not supported")
        n = batch_size or self.batch_size
        mine = [self.pairs[i] for i in self._take(n * self.world)[n * self.rank:n * (self.rank + 1)]]
        rows = [row_arrays([e], self.block_size + 1, self.pad_id)
                for e in [p.chosen for p in mine] + [p.rejected for p in mine]]
        tokens, train, _ = (np.stack(a) for a in zip(*rows))
        x, y, _ = to_device(tokens, train, None, self.device)
        return x, y
