"""Random fixed-length training windows drawn from prepared token files."""

from __future__ import annotations

import numpy as np
import torch

from data.corpus import DataError
from data.prepare import PreparedData


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

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,),
                               generator=self.generator).numpy()
        window = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
