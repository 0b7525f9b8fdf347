"""The trainer's checkpoint half: what a checkpoint holds, writing it, and resuming from it exactly.

A mixin of train/trainer.py's Trainer (it reads the trainer's model, optimizer, batches and
counters): weights and optimizer state (with LoRA the adapter alone, its base being INIT_FROM's),
scaler, step, data position (the corpus sampler's generator and counts, or SFT/DPO batches' epoch and
cursor) and every RNG stream, so a resumed run continues as if never stopped.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from data.tokenizer import check_vocab_fits
from parallel import runtime
from train import checkpoint
from train.checkpoint import CheckpointError
from train.lora import adapter_state, load_adapter_state
from train.state import capture_rng, incompatibilities, restore_rng


class Checkpointing:
    """Trainer methods for checkpoints (see the module docstring)."""

    def step_streams(self) -> dict:
        """The random streams a training step draws from (data order, torch's CPU and CUDA generators),
        taken at each step's start (about a microsecond) so a step that fails can be checkpointed untaken."""
        streams = {**self.data_position(copy=True), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            streams["cuda"] = torch.cuda.get_rng_state_all()
        return streams

    def position(self, before: dict | None = None) -> dict:
        """The data position and every RNG state: now, or with ``before`` (step_streams) as of then."""
        streams = before or self.data_position()
        rng = capture_rng()
        rng.update({k: v for k, v in (before or {}).items() if k in ("torch", "cuda")})
        if self.post:
            return {"data_state": streams["data_state"], "rng": rng}
        return {"data_rng": streams["data_rng"], "data_counts": streams["data_counts"].tolist(), "rng": rng}

    def data_position(self, copy: bool = False) -> dict:
        """Where the training batches are: the corpus sampler's generator and per-source counts, or the
        SFT/DPO batches' epoch and cursor."""
        if self.post:
            return {"data_state": self.batches.state_dict()}
        counts = self.batches.counts
        return {"data_rng": self.batches.generator.get_state(), "data_counts": counts.copy() if copy else counts}

    def state(self, step: int, val_loss: float | None, elapsed: float, before: dict | None = None) -> dict:
        """Everything needed to continue exactly: weights, optimizer, scaler, step, data position, RNG
        (``before``: the streams at the start of a step that failed, which the checkpoint leaves untaken).
        Under a sharded engine, weights and optimizer state go to the engine's own files instead."""
        weights = {} if self.sharded else {"model": self.model_state(), "optimizer": self.optimizer.state_dict()}
        if self.post and self.post.lora:  # the adapter apart from its base (INIT_FROM, recorded in init_from)
            weights["lora"] = self.post.lora.to_dict()
        return {
            "format": 2,
            "step": step,
            "tokens": self.tokens_before(step),
            "curriculum_stage": self.curriculum.stage_at(max(step - 1, 0)).index,
            **weights,
            "engine": self.dist.engine,
            "world_size": self.dist.world_size,
            "scaler": self.scaler.state_dict(),
            "model_config": asdict(self.model.config),
            "tokenizer": self.tokenizer.spec,
            "config": dict(self.cfg),
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "best_val_step": self.best_step,
            "best_val_bpb": self.best_bpb,
            "init_from": self.parent,
            "skipped_steps": self.guard.skipped,
            "wall_time_s": elapsed,
            **self.position(before),
        }

    def save_checkpoint(self, step: int, val_loss: float | None, elapsed: float, before: dict | None = None) -> None:
        self._save(step, self.state(step, val_loss, elapsed, before))
        self.last_save = self.clock()

    def _save(self, step: int | None, state: dict) -> None:
        """Write a step checkpoint (or best, step None). Every rank calls it; rank 0 writes files."""
        if self.sharded:
            tmp, final = checkpoint.sharded_paths(self.run_dir, step)
            runtime.save_sharded(self.dist, tmp, self.model, self.optimizer, self.ds)
            if self.dist.main:
                checkpoint.complete_sharded(tmp, final, state)
                if step is not None:
                    checkpoint.prune(self.run_dir, self.loop.checkpoint_keep)
        elif self.dist.main:
            if step is None:
                checkpoint.save_best(self.run_dir, state)
            else:
                checkpoint.save_step(self.run_dir, step, state, self.loop.checkpoint_keep)
        runtime.barrier(self.dist)

    def resume(self) -> None:
        """Continue from the run directory's newest readable checkpoint."""
        path, state = checkpoint.newest(self.run_dir, warn=self.log)
        check_vocab_fits(self.tokenizer, state["model_config"]["vocab_size"], str(path))
        problems = incompatibilities(state["config"], self.cfg)
        if problems:
            raise CheckpointError(f"{path} was trained with a different model; differing symbols: "
                                  + "; ".join(problems))
        recorded = state.get("init_from") or {}
        if self.post and self.parent and recorded.get("weights_sha256") != self.parent.get("weights_sha256"):
            raise CheckpointError(
                f"{path}: the weights of CONFIG_INIT_FROM changed since this run started ({self.parent['path']} sha256 "
                f"{str(self.parent.get('weights_sha256'))[:12]}, recorded {recorded.get('path')} sha256 "
                f"{str(recorded.get('weights_sha256'))[:12]}); {self.post.kind.upper()} reads them again on resume "
                "(LoRA's frozen base, DPO's reference): restore the original parent there, or start a new run directory")
        saved = state.get("engine", "none")
        if bool(state.get("sharded")) != self.sharded:
            raise CheckpointError(f"{path} was written by CONFIG_PARALLEL_{saved.upper()}, which this run "
                                  f"(PARALLEL_{self.dist.engine.upper()}) cannot read; continue with the same engine")
        if self.sharded:
            if saved != self.dist.engine:
                raise CheckpointError(f"{path} is a {saved} checkpoint; this run uses {self.dist.engine}")
            runtime.load_sharded(self.dist, Path(state["sharded"]), self.model, self.optimizer, self.ds)
        else:
            if self.post and self.post.lora:  # the base came from INIT_FROM when the model was built
                load_adapter_state(self.model, state["model"])
            else:
                self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("world_size", 1) != self.dist.world_size:
            self.log(f"resuming on {self.dist.world_size} process(es) a run checkpointed on "
                     f"{state.get('world_size', 1)}")
        self.scaler.load_state_dict(state["scaler"])
        if self.post:
            self.batches.load_state_dict(state["data_state"])
        else:
            self.batches.generator.set_state(state["data_rng"])
            if len(state.get("data_counts", ())) == len(self.batches.counts):
                self.batches.counts[:] = state["data_counts"]
        restore_rng(state["rng"])
        self.start_step, self.elapsed_before = state["step"], state["wall_time_s"]
        self.last_downstream = self.start_step
        self.best_val, self.best_step = state["best_val_loss"], state["best_val_step"]
        # checkpoints written before bits per byte and warm starts lack these entries
        self.best_bpb, self.parent, self.resumed = state.get("best_val_bpb"), state.get("init_from"), True
        self.guard.skipped = state["skipped_steps"]
        self.metrics.resume_at(self.start_step, warn=self.log)
        stage = (f", curriculum stage {self.curriculum.stage_at(self.start_step).index}"
                 if self.curriculum.active else "")
        self.log(f"resumed from step {self.start_step} ({self.tokens_before(self.start_step):,} tokens"
                 f"{stage}) of {path.name}" + (" (INIT_FROM is not read again)" if self.loop.init_from else ""))

    def model_state(self) -> dict:
        """The checkpoint's "model": the state dict, or with LoRA the adapter (and what trains in full) alone."""
        if self.post and self.post.lora:
            return adapter_state(self.model, extra=self.post.trained_in_full)
        return self.model.state_dict()
