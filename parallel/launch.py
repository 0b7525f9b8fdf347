"""The command that trains one run: plain ``python -m train`` or torchrun for data parallelism.

torchrun (torch.distributed.run) starts NPROC_PER_NODE processes per node for every engine,
DeepSpeed included (deepspeed.init_distributed reads torchrun's environment). One node uses
torchrun's standalone rendezvous, which picks a free port, so several runs can share a machine;
several nodes meet at RDZV_ENDPOINT. The environment variables NODE_RANK, MASTER_ADDR and
MASTER_PORT, as cluster scripts set them, override the configuration at launch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def procs_per_node(cfg, gpus: int | None = None) -> int:
    """NPROC_PER_NODE, with 0 meaning one process per visible GPU."""
    if cfg.PARALLEL == "none":
        return 1
    if cfg.NPROC_PER_NODE:
        return cfg.NPROC_PER_NODE
    gpus = gpu_count() if gpus is None else gpus
    if not gpus:
        raise RuntimeError("CONFIG_NPROC_PER_NODE=0 starts one process per GPU, but this machine has no CUDA GPU; "
                           "set NPROC_PER_NODE (e.g. make SET=NPROC_PER_NODE=2 to run 2 CPU processes over gloo)")
    return gpus


def train_command(cfg, run_dir: Path, resume: bool) -> list[str]:
    """argv that trains the run in ``run_dir`` on this node."""
    train = ["-m", "train", str(run_dir)] + (["--resume"] if resume else [])
    if cfg.PARALLEL == "none":
        return [sys.executable, *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs_per_node(cfg)}"]
    if cfg.NNODES == 1:
        launcher.append("--standalone")
    else:
        host, _, port = cfg.RDZV_ENDPOINT.rpartition(":")
        if not host or not port.isdigit():
            raise RuntimeError(f"CONFIG_RDZV_ENDPOINT={cfg.RDZV_ENDPOINT!r} is not host:port")
        node_rank = os.environ.get("NODE_RANK", str(cfg.NODE_RANK))
        launcher += [f"--nnodes={cfg.NNODES}", f"--node-rank={node_rank}",
                     f"--master-addr={os.environ.get('MASTER_ADDR', host)}",
                     f"--master-port={os.environ.get('MASTER_PORT', port)}"]
    return launcher + train


def launch_env(cfg) -> dict[str, str]:
    """Extra environment for the training processes."""
    env = {}
    if cfg.PARALLEL == "deepspeed" and not gpu_count():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU backend (gloo); it cannot detect this itself
    if cfg.PARALLEL != "none" and not gpu_count():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs_per_node(cfg))))
    return env


CHECK_GPUS_PER_NODE = 8  # what 'make check' assumes for NPROC_PER_NODE=0 on a machine without GPUs


def check_layout(cfg, grad_accum_varies: bool = False) -> tuple[int, str, list[str]]:
    """For 'make check': (world size, what plan/memory.py shards, notes); RuntimeError for a layout
    that cannot run."""
    if cfg.PARALLEL == "none":
        return 1, "none", []
    notes = []
    per_node = cfg.NPROC_PER_NODE or gpu_count()
    if not per_node:
        per_node = CHECK_GPUS_PER_NODE
        notes.append(f"NPROC_PER_NODE=0: {per_node} GPUs per node assumed")
    if cfg.NODE_RANK >= cfg.NNODES:
        raise RuntimeError(f"CONFIG_NODE_RANK={cfg.NODE_RANK} must be below CONFIG_NNODES={cfg.NNODES}")
    if cfg.PARALLEL == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError("CONFIG_PARALLEL_DEEPSPEED=y needs DeepSpeed: pip install deepspeed")
        deepspeed_batch_check(grad_accum_varies)
    world = per_node * cfg.NNODES
    notes.append(f"world size {world} = {per_node} x {cfg.NNODES} node(s), "
                 f"{cfg.MICRO_BATCH * cfg.GRAD_ACCUM * world} sequences per step")
    shard = {"ddp": "ddp", "fsdp2": "fsdp", "deepspeed": f"zero{cfg.DEEPSPEED_ZERO_STAGE}"}[cfg.PARALLEL]
    return world, shard, notes


def deepspeed_batch_check(grad_accum_varies: bool) -> None:
    if grad_accum_varies:
        raise RuntimeError("CONFIG_BATCH_WARMUP_FRACTION>0 with CONFIG_PARALLEL_DEEPSPEED=y: DeepSpeed accumulates "
                           "a fixed GRAD_ACCUM micro-batches per step; use DDP or FSDP2, or no batch warmup")
