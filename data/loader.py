"""Random fixed-length training windows drawn from prepared token files, from one source or a weighted mix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data.cache import PreparedData
from data.errors import DataError


class Batches:
    """Draws (x, y) batches of ``block_size`` tokens, y shifted by one, from a split.

    Positions come from a seeded torch.Generator, so the data order is a
    function of the seed alone.
    """

    def __init__(self, data: PreparedData, split: str, batch_size: int, block_size: int,
                 device: torch.device, seed: int):
        self.tokens = data.tokens(split)
        self.split = split
        if len(self.tokens) <= block_size + 1:
            raise DataError(
                f"the {split} split of {data.path} has {len(self.tokens)} tokens, too few for "
                f"CONFIG_BLOCK_SIZE={block_size} (needs at least {block_size + 2}); use more data, "
                f"a smaller BLOCK_SIZE or a {'larger' if split == 'val' else 'smaller'} VAL_FRACTION")
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def starts(self, n: int, generator: torch.Generator, length: int | None = None) -> np.ndarray:
        """``n`` random starts of windows of ``length`` (default block_size) tokens, drawn from ``generator``."""
        return torch.randint(len(self.tokens) - (length or self.block_size) - 1, (n,), generator=generator).numpy()

    def windows(self, starts: np.ndarray, length: int | None = None) -> np.ndarray:
        """(len(starts), length + 1) token ids as int64; length defaults to block_size."""
        offsets = self._offsets if length in (None, self.block_size) else np.arange(length + 1)
        return self.tokens[starts[:, None] + offsets].astype(np.int64)

    rank, world = 0, 1

    def shard(self, rank: int, world: int) -> "Batches":
        """Keep this rank's slice of the global batch (see MixedBatches.shard)."""
        self.rank, self.world = rank, world
        return self

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.batch_size
        starts = self.starts(n * self.world, self.generator)[n * self.rank:n * (self.rank + 1)]
        return to_device(self.windows(starts), self.device)


class MixedBatches:
    """Batches whose every sequence comes from one of several sources, chosen by weight.

    One seeded generator draws both each sequence's source and its position, so the
    data order is a function of the seed, and that generator's state (``.generator``,
    stored as a checkpoint's data_rng) is all an exact resume needs. With one source
    no source draw is made: the batches equal a plain Batches with the same seed.
    ``counts`` is the number of sequences drawn from each source.
    """

    def __init__(self, parts: Sequence[Batches], weights: Sequence[float], seed: int):
        if len(parts) != len(weights) or not parts:
            raise ValueError("MixedBatches needs one positive weight per source")
        self.parts = list(parts)
        self.batch_size, self.block_size, self.device = parts[0].batch_size, parts[0].block_size, parts[0].device
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        self._cumulative = torch.cumsum(w / w.sum(), 0)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = np.zeros(len(parts), dtype=np.int64)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def choose(self, n: int) -> np.ndarray:
        """The source index of each of ``n`` sequences, drawn from the generator by weight."""
        u = torch.rand(n, generator=self.generator, dtype=torch.float64)
        return torch.searchsorted(self._cumulative, u, right=True).clamp_(max=len(self.parts) - 1).numpy()

    def shard(self, rank: int, world: int) -> "MixedBatches":
        """Draw the global batch of ``world`` ranks and keep this rank's slice: every rank draws the
        same random numbers, so the ranks' slices together are the single-process batch."""
        self.rank, self.world = rank, world
        return self

    rank, world = 0, 1

    def next(self, batch_size: int | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``batch_size`` sequences of ``length`` tokens (defaults: the constructor's; a
        curriculum stage asks for its own shape, never longer than block_size)."""
        n, length = batch_size or self.batch_size, length or self.block_size
        total, lo = n * self.world, n * self.rank
        if len(self.parts) == 1:
            self.counts[0] += total
            part = self.parts[0]
            starts = part.starts(total, self.generator, length)[lo:lo + n]
            return to_device(part.windows(starts, length), self.device)
        choice = self.choose(total)
        rows = np.empty((n, length + 1), dtype=np.int64)
        for i, part in enumerate(self.parts):
            where = np.flatnonzero(choice == i)
            if len(where):
                starts = part.starts(len(where), self.generator, length)
                mine = (where >= lo) & (where < lo + n)
                if mine.any():
                    rows[where[mine] - lo] = part.windows(starts[mine], length)
            self.counts[i] += len(where)
        return to_device(rows, self.device)

    def shares(self, names: Sequence[str]) -> dict[str, float]:
        """The fraction of sequences drawn so far from each source, by name."""
        total = max(1, int(self.counts.sum()))
        return {name: int(c) / total for name, c in zip(names, self.counts)}


def to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.from_numpy(rows)
    if device.type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
