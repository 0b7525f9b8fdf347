"""The GPU tier's fixtures: every test runs on CUDA at real sizes, or on the CPU at tiny sizes under the
dry run (GPU_CHECK_DRY_RUN=1, what 'scripts/gpu_check.py --dry-run' sets), so the tier's code runs in the
CPU suite and cannot rot between GPU runs. Without CUDA and without the dry run every test is skipped.

Each test builds through the project's own path: a generated corpus prepared by data/prepare.py, a config
resolved through the real Kconfig (``config_of``), and train/trainer.py's Trainer (train/build.py inside).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import config_of
from data.prepare import prepare
from train.trainer import Trainer

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
SKIP_REASON = "needs CUDA; GPU_CHECK_DRY_RUN=1 runs it on CPU with tiny shapes"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model and batch sizes of the tier. Every dim is a multiple of 16 (FP8 GEMMs need that) and the
    head dim a multiple of 8 up to 256 (flash and memory-efficient SDPA take those)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    micro_batch: int
    steps: int  # optimizer steps of the short training comparisons
    corpus_repeats: int  # lines of the generated corpus, in copies of its 12-line grammar

    def settings(self) -> str:
        return (f"MODEL_SIZE_CUSTOM=y N_LAYER={self.n_layer} N_HEAD={self.n_head} N_EMBD={self.n_embd} "
                f"BLOCK_SIZE={self.block_size} MICRO_BATCH={self.micro_batch}")


CUDA_SHAPES = Shapes(n_layer=4, n_head=4, n_embd=256, block_size=128, micro_batch=16, steps=50, corpus_repeats=2000)
CPU_SHAPES = Shapes(n_layer=2, n_head=2, n_embd=64, block_size=32, micro_batch=8, steps=50, corpus_repeats=120)


def pytest_collection_modifyitems(items):
    """The compile tests last: on CUDA they are the slowest (inductor's code generation, max-autotune's
    kernel benchmarks), so a tier stopped at its time budget ('scripts/gpu_check.py') has run the rest."""
    items.sort(key=lambda item: item.path.name == "test_compile_gpu.py")  # stable: the rest keep their order


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda when torch sees a GPU; cpu under the dry run; else the test is skipped."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if DRY_RUN:
        return torch.device("cpu")
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def shapes(device) -> Shapes:
    return CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES


def make_corpus(path: Path, repeats: int) -> None:
    # The grammar of tests/test_trainer.py: learnable structure well above the unigram baseline.
    lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox", "owl") for b in ("one", "two", "six")]
    path.write_text("\n".join(lines * repeats) + "\n")


def base_settings(device: torch.device, shapes: Shapes) -> str:
    where = "DEVICE_CUDA=y" if device.type == "cuda" else "DEVICE_CPU=y CPU_THREADS=1"
    return (f"DATA_PATH=corpus.txt DATA_CACHE_DIR=cache {shapes.settings()} MAX_ITERS={shapes.steps} "
            "WARMUP_ITERS=5 LR=3e-3 MIN_LR=3e-4 EVAL_INTERVAL=100000 EVAL_BATCHES=2 LOG_INTERVAL=1 "
            f"SAMPLE_TOKENS=5 SEED=5 {where}")


def build_trainer(folder: Path, device: torch.device, shapes: Shapes, name: str, extra: str = "") -> Trainer:
    """A Trainer in folder/name on ``device`` at ``shapes``, over folder's generated corpus (written on first
    use, prepared once: prepared data is keyed by content)."""
    corpus = folder / "corpus.txt"
    if not corpus.exists():
        make_corpus(corpus, shapes.corpus_repeats)
    cfg = config_of(base_settings(device, shapes), extra)
    run_dir = folder / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, prepare(cfg, folder, log=lambda m: None), run_dir, log=lambda m: None)


@pytest.fixture
def trainer_of(tmp_path, device, shapes):
    """``trainer_of("name", "DTYPE_BF16=y ...")``: build_trainer in the test's tmp_path."""
    return lambda name, extra="": build_trainer(tmp_path, device, shapes, name, extra)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> train_loss of a run's metrics.jsonl (LOG_INTERVAL=1: every step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
