"""Peak training memory measured on CPU: every live tensor storage over real training steps.

What tests/test_memory.py compares train/memory.py's closed-form prediction against.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from train.memory import ACT_BYTES

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LiveStorage(TorchDispatchMode):
    """Tracks the bytes of every distinct tensor storage alive, and their peak."""

    def __init__(self, tensors=()):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()  # _cdata: the StorageImpl, shared by views
        if nbytes == 0 or key in self.sizes:
            return
        self.sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key).atexit = False  # fires when the storage dies

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def measure_peak_memory(model, optimizer, make_batch, dtype: str = "fp32", steps: int = 2, step_loss=None,
                        also=()) -> int:
    """Measured peak bytes of live tensor storage over ``steps`` CPU training steps.

    Each step runs like train/trainer.py's: forward (under CPU autocast unless fp32), backward,
    optimizer.step(), zero_grad(set_to_none=True), with the logits referenced until the step
    ends (the trainer's ``_``). Parameters, buffers, existing grads and optimizer state count
    from the start; the peak is the largest number of bytes alive at once.

    ``step_loss(batch) -> loss`` replaces the forward for a post-training objective (the trainer's
    ``PostTraining.loss``, which keeps no logits past its return); ``also``: more modules alive
    throughout, such as DPO's frozen reference.
    """
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_BYTES)}")
    before = [t for m in (model, *also) for t in (*m.parameters(), *m.buffers())]
    before += [p.grad for p in model.parameters() if p.grad is not None]
    before += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracker = LiveStorage(before)
    with tracker:
        for _ in range(steps):
            batch = make_batch()
            with torch.autocast("cpu", dtype=AUTOCAST[dtype]) if dtype in AUTOCAST else contextlib.nullcontext():
                if step_loss is None:
                    logits, loss = model(*batch)  # noqa: F841 (referenced through the step, as in the trainer)
                else:
                    logits, loss = None, step_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, loss
    return tracker.peak
