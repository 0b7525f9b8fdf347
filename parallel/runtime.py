"""Inside a training process: the process group, and the model wrapped for the configured engine.

Data parallelism keeps the single-process semantics exactly: every rank draws the same global
batch (MICRO_BATCH x world size sequences, from the same seeded generator) and trains on its own
slice of it, and the engines average gradients over ranks, so a step equals the single-process
step on the whole global batch (up to floating-point reduction order).

- DDP: the model is replicated; micro-batches before the last of a step skip the all-reduce
  (``no_sync``).
- FSDP2: ``fully_shard`` on every block, then the root; micro-batches before the last skip the
  reduce-scatter (``set_requires_gradient_sync(False)``).
- DeepSpeed: ``deepspeed.initialize`` with ZeRO stage DEEPSPEED_ZERO_STAGE around the project's
  own optimizer (AdamW, Lion or SGD), gradient accumulation and clipping done by the engine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    engine: str  # none | ddp | fsdp2 | deepspeed
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics and summaries."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 or self.engine != "none"


def init(cfg) -> Dist:
    """Join the process group torchrun set up (nothing for a single process)."""
    kind = cfg.PARALLEL
    if kind == "none":
        return Dist("none")
    if "RANK" not in os.environ:
        raise RuntimeError(f"CONFIG_PARALLEL_{kind.upper()}=y: this process was not started by torchrun; "
                           "train through 'make' (or torchrun --nproc-per-node=N -m train RUN_DIR)")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and cfg.DEVICE != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    elif not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(kind, rank, local, world, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a scalar tensor (itself for one process)."""
    if not d.active:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / d.world_size


def any_rank(d: Dist, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when any rank says so (to stop every rank together); one all-reduce."""
    if not d.active:
        return flags
    t = torch.tensor([float(f) for f in flags], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: DDP around the model, or the model sharded in place."""
    if d.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in (*model.blocks, *model.mtp_blocks):
            fully_shard(block)
        fully_shard(model)
    return model


def gradient_sync(module: torch.nn.Module, d: Dist, sync: bool):
    """Context for one micro-batch's backward: communicate gradients only when ``sync`` (the last)."""
    if d.engine == "ddp" and not sync:
        return module.no_sync()
    if d.engine == "fsdp2":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def deepspeed_engine(model, optimizer, cfg, dtype: str):
    """deepspeed.initialize around our model and optimizer; returns the engine."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": cfg.MICRO_BATCH,
        "gradient_accumulation_steps": cfg.GRAD_ACCUM,
        "gradient_clipping": cfg.GRAD_CLIP if cfg.GRAD_CLIP > 0 else 0.0,
        "zero_optimization": {"stage": cfg.DEEPSPEED_ZERO_STAGE},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,  # our AdamW/Lion/SGD, not DeepSpeed's own
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # our trainer logs
        "wall_clock_breakdown": False,
    }
    if cfg.DEEPSPEED_OFFLOAD_OPTIMIZER:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    engine_, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine_


def save_sharded(d: Dist, folder, model, optimizer, ds) -> None:
    """Every rank writes its shards of weights and optimizer state into ``folder`` (a fresh one)."""
    if d.main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
    barrier(d)
    if ds is not None:
        ds.save_checkpoint(str(folder.parent), tag=folder.name)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not optimizer.state:  # before the first step (a warm start's step-0 best): the weights alone, since
            # get_state_dict would create the optimizer's state by a zero-gradient step (Adam's step count 1)
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder))
        else:
            weights, optim = get_state_dict(model, optimizer)
            dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))
    barrier(d)


def load_sharded(d: Dist, folder, model, optimizer, ds) -> None:
    """Load a sharded checkpoint; torch distributed checkpointing reshards to this world size.
    The folder's pickles are checked first (parallel/untrusted.py): one from elsewhere runs no code."""
    from parallel import untrusted  # here, not at the top: DCP's modules take half a second to import

    if ds is not None:
        untrusted.check_deepspeed_folder(folder)
        path, _ = ds.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    untrusted.check_dcp_folder(folder)
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": optim}
    with untrusted.dcp_refusals():
        dcp.load(state, storage_reader=untrusted.SafeFileSystemReader(str(folder)),
                 planner=untrusted.SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_weights(folder, engine_name: str) -> dict:
    """The whole model's weights from a sharded checkpoint folder, in one process without a process
    group (for 'make sample'): DCP's single-process read of the "model" entries, or DeepSpeed's
    zero_to_fp32; the folder's pickles checked first, as in load_sharded."""
    from parallel import untrusted  # as in load_sharded

    folder = Path(folder)
    if engine_name == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        untrusted.check_deepspeed_folder(folder)
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # What torch's dcp_to_torch_save does, minus the file: dcp.load would copy only the keys the
    # caller's dict already has, and this one is filled from the metadata by the planner.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    untrusted.check_dcp_folder(folder)
    state: dict = {}
    with untrusted.dcp_refusals():  # only the weights: the optimizer entries are not read
        _load_state_dict(state, storage_reader=untrusted.SafeFileSystemReader(str(folder)),
                         planner=untrusted.SafeEmptyLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]
