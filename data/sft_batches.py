"""Batches of tokenized examples (SFT): packed several to a sequence, or one each, padded.

Each epoch orders the examples by a permutation seeded with (seed, epoch); with packing they are
placed first-fit into rows of block_size + 1 tokens (whole examples only, rows in the order they
were opened), without it each example is its own row. A row of block_size + 1 tokens gives
x = its first block_size tokens and y = the last block_size, with y = -100 where no loss is taken:
prompt tokens, padding, and the first token of each example (which follows another example).
``doc`` numbers the examples of each row 0, 1, 2... (padding gets the next number, so ``doc``
never decreases along a row); it is None without packing. Padding is ``pad_id`` (the template's
closing token). Deterministic by seed; the epochs follow one another without a gap.

Data-parallel: every rank draws the same global batch (batch_size x world rows) and keeps its
slice, as data/loader.py's Batches does, so the ranks together see the single-process batches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.errors import DataError

IGNORE = -100  # the target of a position without loss (torch's cross_entropy ignore_index)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices (into ``lengths``, taken in order) grouped first-fit into rows of at most ``capacity``."""
    room = np.empty(0, dtype=np.int64)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        fits = np.flatnonzero(room >= n)
        if len(fits):
            rows[fits[0]].append(i)
            room[fits[0]] -= n
        else:
            rows.append([i])
            room = np.append(room, capacity - n)
    return rows


def row_arrays(examples, capacity: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, targets-allowed, doc) of one row of ``capacity`` tokens holding ``examples`` back to back."""
    tokens = np.full(capacity, pad_id, dtype=np.int64)
    train = np.zeros(capacity, dtype=bool)
    doc = np.full(capacity, len(examples), dtype=np.int64)
    at = 0
    for number, e in enumerate(examples):
        n = len(e.ids)
        tokens[at:at + n], train[at + 1:at + n], doc[at:at + n] = e.ids, e.mask[1:], number
        at += n
    return tokens, train, doc


class EpochBatches:
    """Items (SFT rows, DPO pairs) in a seeded order per epoch, drawn in that order across epochs; the
    position is (epoch, cursor), and every rank draws the same global batch and keeps its slice."""

    rank, world = 0, 1

    def _epoch_items(self, epoch: int) -> list:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the first batch of the first epoch."""
        self.epoch, self.cursor = 0, 0
        self._items = self._epoch_items(0)

    def shard(self, rank: int, world: int):
        """Keep this rank's slice of each global batch."""
        self.rank, self.world = rank, world
        return self

    def state_dict(self) -> dict:
        """Where the batches are (JSON-serializable): an exact resume restores it with load_state_dict."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._items = self._epoch_items(self.epoch)

    def _take(self, n: int) -> list:
        """The next ``n`` items of the global order, across epochs."""
        items = []
        while len(items) < n:
            if self.cursor == len(self._items):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._items = self._epoch_items(self.epoch)
            step = min(n - len(items), len(self._items) - self.cursor)
            items += self._items[self.cursor:self.cursor + step]
            self.cursor += step
        return items


class SFTBatches(EpochBatches):
    """``next() -> (x, y, doc)`` over tokenized examples (objects with int64 ``ids`` and bool ``mask``)."""

    def __init__(self, examples: Sequence, batch_size: int, block_size: int, device: torch.device, seed: int,
                 packing: bool, pad_id: int = 0):
        if not examples:
            raise DataError("no SFT examples to draw batches from; check CONFIG_SFT_DATA")
        too_long = [e for e in examples if len(e.ids) > block_size + 1]
        if too_long:
            raise DataError(f"{too_long[0].where}: {len(too_long[0].ids)} tokens, longer than CONFIG_BLOCK_SIZE="
                            f"{block_size} + 1 (tokenize with this BLOCK_SIZE, or set CONFIG_SFT_TRUNCATE=y)")
        self.examples = list(examples)
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.seed, self.packing, self.pad_id = seed, packing, pad_id
        self.reset()

    @property
    def rows_per_epoch(self) -> int:
        return len(self._items)

    def _epoch_items(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        if not self.packing:
            return [[int(i)] for i in order]
        return [[int(order[j]) for j in row]
                for row in pack_rows([len(self.examples[i].ids) for i in order], self.block_size + 1)]

    def next(self, batch_size: int | None = None, seq_len: int | None = None):
        """This rank's (x, y, doc): (batch_size, block_size) int64 tensors; doc is None without packing."""
        if seq_len not in (None, self.block_size):
            raise DataError(f"SFT batches are whole examples of up to CONFIG_BLOCK_SIZE={self.block_size} tokens; "
                            f"a sequence length of {seq_len} (a curriculum stage) is not supported: turn the "
                            "curriculum off for a fine-tuning run")
        n = batch_size or self.batch_size
        rows = self._take(n * self.world)[n * self.rank:n * (self.rank + 1)]
        parts = [row_arrays([self.examples[i] for i in row], self.block_size + 1, self.pad_id) for row in rows]
        tokens, train, doc = (np.stack(a) for a in zip(*parts))
        return to_device(tokens, train, doc if self.packing else None, self.device)


def to_device(tokens: np.ndarray, train: np.ndarray, doc: np.ndarray | None, device: torch.device):
    """(x, y, doc) tensors from rows of block_size + 1 tokens: y masked to -100 where ``train`` is False."""
    targets = np.where(train, tokens, IGNORE)
    out = [torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])), torch.from_numpy(np.ascontiguousarray(targets[:, 1:]))]
    out.append(None if doc is None else torch.from_numpy(np.ascontiguousarray(doc[:, :-1])))
    if device.type == "cuda":
        out = [t if t is None else t.pin_memory().to(device, non_blocking=True) for t in out]
    return tuple(out)
