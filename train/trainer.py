"""The training loop: one run, from a resolved configuration to a checkpoint and summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from data.mix import PreparedMix, as_mix
from data.cache import PreparedData
from harness.evaluate import EvalConfig
from kconfig.tree import ROOT
from model.gpt import GPT, ModelConfig
from optim.optimizers import OptimizerConfig, describe, set_lr
from optim.schedule import lr_at
from parallel import runtime
from parallel.launch import check_layout, deepspeed_batch_check
from train import checkpoint
from train.build import build_model_and_optimizer, padded_vocab
from train.checkpoint import CheckpointError
from train.checkpointing import Checkpointing
from train.curriculum import Curriculum
from train.device import (DeviceConfig, autocast, compile_model, device_name, resolve_device, resolve_dtype,
                          setup_backend)
from train.health import NonFiniteGuard
from train.loop_config import LoopConfig
from train.memory import predict_run_memory
from train.metrics import MetricsLog, Throughput, mfu
from train.moe_stats import MoEStats
from train.precision import fp8_autocast
from train.progress import TrainProgress
from train.sample import generate_text, provenance
from train.signals import StopRequest
from train.time_split import TimeSplit
from train.system_metrics import sample_system
from train.trackers import Trackers
from train.post_training import DPO_SHOWN, PostTraining
from train.warm_start import load_parent


class Trainer(Checkpointing):
    def __init__(self, cfg, data: PreparedData | PreparedMix, run_dir: Path, log=print, dist=None):
        self.cfg, self.data, self.run_dir = cfg, as_mix(data), Path(run_dir)
        data = self.data
        self.loop, self.optim = LoopConfig.from_config(cfg), OptimizerConfig.from_config(cfg)
        self.device_config = DeviceConfig.from_config(cfg)
        self.dist = dist or runtime.init(cfg)  # the process group under torchrun; nothing for one process
        main = self.dist.main  # rank 0 alone logs, shows progress and writes metrics and trackers
        self.progress = TrainProgress.from_config(cfg, self.loop.max_iters) if main else TrainProgress(0, enabled=False)
        self.log = self.progress.wrap_log(log if main else (lambda message: None))
        self.device = resolve_device(self.device_config, self.dist.local_rank)
        setup_backend(self.device_config, self.device, self.dist.local_world_size)
        self.dtype = resolve_dtype(self.device_config, self.device)
        self.device_name = device_name(self.device)
        # SFT or DPO: the chat template's special tokens join the tokenizer (the model's vocabulary may grow)
        self.post = PostTraining(cfg, data.tokenizer, self.log) if cfg.OBJECTIVE != "pretrain" else None
        self.tokenizer = self.post.tokenizer if self.post else data.tokenizer
        self.parent, self.parent_state = None, None  # INIT_FROM's record for summary.json, and its checkpoint
        built = build_model_and_optimizer(
            ModelConfig.from_config(cfg, padded_vocab(self.tokenizer.vocab_size)), self.optim,
            self.device_config.fp8, self.loop.seed, self.device,  # INIT_FROM's weights go in before any wrapper:
            wrap=lambda model: runtime.wrap(self.start_from_parent(model), self.dist, self.device))  # DDP, FSDP2
        self.model, self.module, self.optimizer, self.fp8 = built.model, built.module, built.optimizer, built.fp8
        self.flops_per_token = self.model.flops_per_token()  # counted once, used at every log line
        self.optimizer_description = describe(self.optimizer)  # before DeepSpeed flattens the groups
        self.ds = None
        if self.dist.engine == "deepspeed":
            self.ds = self.module = runtime.deepspeed_engine(self.model, self.optimizer, cfg, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        self.curriculum = Curriculum.from_config(cfg)
        if self.ds is not None:
            deepspeed_batch_check(self.curriculum.grad_accum_at(0) != self.loop.grad_accum)
        mode = self.device_config.compile_mode
        self.forward = compile_model(self.module, mode, len(self.curriculum.shapes())) if mode else self.module
        self.moe_stats = MoEStats(self.model.moe_layers, self.device)
        # Each sequence's source is drawn by weight; with one source these are plain Batches' draws. Every
        # rank draws the same global batch and trains on its own slice (parallel/runtime.py).
        loop, rank, world = self.loop, self.dist.rank, self.dist.world_size
        if self.post:  # SFT examples or DPO pairs; the corpus gives the tokenizer only
            self.batches, self.eval_train, self.val_sets = self.post.batches(cfg, loop, self.device, rank, world,
                                                                             ROOT, self.log)
        else:
            self.batches = data.train_batches("train", loop.micro_batch, loop.block_size, self.device,
                                              loop.seed).shard(rank, world)
            # Evaluation reuses the same batches every time (fixed seed), so curves compare across steps and runs.
            self.eval_train = data.train_batches("train", loop.micro_batch, loop.block_size, self.device,
                                                 loop.seed + 1).shard(rank, world)
            self.val_sets = {name: batches.shard(rank, world) for name, batches in
                             data.val_batches(loop.micro_batch, loop.block_size, self.device, loop.seed + 1).items()}
        # Global tokens per optimizer step at full size (after any warmup), all ranks together (DPO: both
        # responses of each pair).
        rows = 2 if self.post and self.post.kind == "dpo" else 1
        self.tokens_per_step = rows * loop.micro_batch * loop.grad_accum * loop.block_size * world
        self.start_step, self.best_val, self.best_step, self.elapsed_before = 0, float("inf"), 0, 0.0
        # per validation set, for bits per byte (none for SFT/DPO's validation examples)
        self.tokens_per_byte = ({name: None for name in self.val_sets} if self.post else data.val_tokens_per_byte())
        self.best_bpb, self.resumed = None, False
        self.downstream = EvalConfig.from_config(cfg, ROOT)  # EVAL_TASKS every EVAL_EVERY steps (0: never)
        self.last_downstream = 0  # the step of the last task evaluation (a resume: the step it starts from)
        # The clocks and the last step's record exist from here on, so every method works before run()
        # (which restarts the clocks); train_step renews the step's record.
        self.speed, self.started, self.last_save = Throughput(), time.time(), self.clock()
        self.times = TimeSplit()  # reset when the loop starts: _run
        self.parts, self.updating, self.step_start = {}, False, None
        self.guard = NonFiniteGuard(loop.max_bad_steps or 1)  # without SKIP_NONFINITE it only counts
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if main else None)
        # The plan directory groups the runs in the trackers.
        self.trackers = (Trackers.from_config(cfg, self.run_dir, self.run_dir.parent.name, self.run_dir.name,
                                              log=self.log) if main else Trackers([], self.log))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """{"train": loss, "val": the aggregate val_loss, "val_losses": {name: loss}, "val_bpb": the aggregate
        bits per byte, "val_bpbs": {name: bits per byte}} (a bpb None where a set has no bytes); DPO adds
        "val_metrics" (preference accuracy, rewards, margin, KL on the validation pairs)."""
        self.model.eval()
        train = self._mean_loss(self.eval_train)
        metrics = {}
        val_losses = {name: self._mean_loss(batches, metrics) for name, batches in self.val_sets.items()}
        self.model.train()
        # nats per token -> bits per byte: times tokens per byte of the same split, over ln 2
        bpbs = {name: None if self.tokens_per_byte[name] is None else loss * self.tokens_per_byte[name] / math.log(2)
                for name, loss in val_losses.items()}
        bpb = None if None in bpbs.values() else self.data.aggregate(bpbs)
        val = val_losses[self.post.kind] if self.post else self.data.aggregate(val_losses)
        result = {"train": train, "val": val, "val_losses": val_losses, "val_bpb": bpb, "val_bpbs": bpbs}
        if metrics:
            result["val_metrics"] = metrics
        return result

    def _mean_loss(self, batches, metrics: dict | None = None) -> float:
        """The mean loss over EVAL_BATCHES batches; a post-training objective's terms averaged into ``metrics``."""
        batches.reset()
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for _ in range(self.loop.eval_batches):
            with autocast(self.device, self.dtype), fp8_autocast(self.device_config.fp8):
                loss, parts = self.batch_loss(batches.next())
            for name, value in parts.items():
                terms[name] = terms.get(name, 0) + value / self.loop.eval_batches
            total += loss.float()
        if metrics is not None:
            metrics.update({name: runtime.mean(self.dist, value).item() for name, value in terms.items()})
        return runtime.mean(self.dist, total / self.loop.eval_batches).item()  # ranks' equal slices: the global mean

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss on one micro-batch and its extra detached terms (none for pretraining, whose
        MTP/MoE terms the model keeps in loss_parts)."""
        if self.post is None:
            x, y = batch
            return self.forward(x, y)[1], {}
        return self.post.loss(self.forward, self.model, batch)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.optim.schedule) * self.curriculum.lr_scale_at(step)

    def tokens_before(self, step: int) -> int:
        """Tokens trained on, all ranks together, before (0-based) step ``step``."""
        return self.curriculum.tokens_before(step) * self.dist.world_size

    def tokens_at(self, step: int) -> int:
        return self.curriculum.tokens_at(step) * self.dist.world_size

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the step's micro-batches (GRAD_ACCUM, fewer during batch warmup), each
        shaped by the curriculum stage. Returns (loss, grad norm) as device tensors; the loss is the
        next-token loss, and the objective's other terms (MTP, MoE) accumulate in self.parts.

        With SKIP_NONFINITE the update is skipped (and counted) when the loss or gradient norm is
        NaN/Inf; that check is the one host sync per step this option costs.
        """
        self.updating = False  # True while the optimizer changes weights: a failure then leaves no good state
        self.step_start = self.step_streams()
        set_lr(self.optimizer, self.lr_at(step))
        stage, accum = self.curriculum.stage_at(step), self.curriculum.grad_accum_at(step)
        loss_sum = torch.zeros((), device=self.device)
        self.parts = {}
        for i in range(accum):
            batch = self.batches.next(stage.micro_batch, stage.seq_len)
            # DDP/FSDP2 communicate gradients on the step's last micro-batch only.
            with runtime.gradient_sync(self.module, self.dist, sync=i == accum - 1):
                with autocast(self.device, self.dtype), fp8_autocast(self.device_config.fp8):
                    loss, terms = self.batch_loss(batch)
                if self.moe_stats:
                    self.moe_stats.collect()
                if self.ds is not None:  # the engine divides by GRAD_ACCUM and steps on the last one
                    self.ds.backward(loss)
                    self.updating = i == accum - 1
                    self.ds.step()
                else:
                    self.scaler.scale(loss / accum).backward()
            parts = ({"lm_loss": loss.detach(), **terms} if self.post else
                     self.model.loss_parts or {"lm_loss": loss.detach()})
            loss_sum += parts["lm_loss"] / accum
            for name, value in parts.items():
                if name != "lm_loss":
                    self.parts[name] = self.parts.get(name, 0) + value / accum
        loss_sum = runtime.mean(self.dist, loss_sum)  # every rank decides alike on NaN/Inf and logs the same
        if self.ds is not None:
            norm = self.ds.get_global_grad_norm()
            grad_norm = torch.tensor(float("nan") if norm is None else float(norm))
            update = not self.loop.skip_nonfinite or self.guard.check(loss_sum.item(), grad_norm.item())  # counts only
        else:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
            update = not self.loop.skip_nonfinite or self.guard.check(loss_sum.item(), grad_norm.item())
            if update:
                self.updating = True
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        if self.moe_stats:
            if self.dist.active:  # every rank moves its expert biases by the global load
                torch.distributed.all_reduce(self.moe_stats.step_load)
            self.moe_stats.end_step(balance=update)
        return loss_sum, grad_norm

    @property
    def sharded(self) -> bool:
        """Weights and optimizer state are split over ranks: checkpoints are folders the engine writes."""
        return self.dist.engine in ("fsdp2", "deepspeed")

    def start_from_parent(self, model: GPT) -> GPT:
        """CONFIG_INIT_FROM's weights into the freshly built model, before a wrapper, an engine or the
        optimizer sees it (so FSDP2 shards and DeepSpeed copies the parent's weights). Not for a run that
        will resume its own checkpoint: INIT_FROM is not read again."""
        if self.post and not self.loop.init_from:
            raise CheckpointError(f"CONFIG_OBJECTIVE_{self.post.kind.upper()} fine-tunes a trained model, but "
                                  "CONFIG_INIT_FROM is empty; set it to a run directory, checkpoint or Hugging Face "
                                  "folder (a chain plan, RUN_CHAIN, fills it from the parent stage)")
        # SFT/DPO read the parent even when resuming: LoRA's frozen base and DPO's reference are its weights
        if self.loop.init_from and (self.post or checkpoint.newest_intact_step(self.run_dir) is None):
            if self.loop.init_from_optimizer and self.sharded:
                raise CheckpointError(f"CONFIG_INIT_FROM_OPTIMIZER is set but CONFIG_PARALLEL_{self.dist.engine.upper()} "
                                      "shards the optimizer state, which a warm start cannot carry yet; unset "
                                      "INIT_FROM_OPTIMIZER (weights only) or use PARALLEL_NONE or PARALLEL_DDP")
            self.parent, self.parent_state = load_parent(self.init_from_path(), self.loop.init_from_checkpoint, model,
                                                         self.tokenizer, self.cfg, self.loop.init_from_optimizer,
                                                         self.log, base_tokenizer=self.data.tokenizer)
        if self.post:
            self.post.prepare(model, self.parent.get("embedding_rows"), self.log)
        return model

    def init_from_path(self) -> Path:
        where = Path(self.loop.init_from).expanduser()
        return where if where.is_absolute() else ROOT / where

    def warm_start(self) -> None:
        """CONFIG_INIT_FROM at step 0 of a fresh run: the parent's weights (loaded when the model was built,
        or here for a model built beside a checkpoint it did not resume) and, with INIT_FROM_OPTIMIZER, its
        optimizer state."""
        if self.parent is None:  # built beside a checkpoint of its own that it did not resume
            if self.sharded:
                raise CheckpointError(f"{self.run_dir} holds a checkpoint of its own: resume it ('make continue') "
                                      "instead of warm-starting it again from CONFIG_INIT_FROM")
            self.parent, self.parent_state = load_parent(self.init_from_path(), self.loop.init_from_checkpoint,
                                                         self.model, self.tokenizer, self.cfg,
                                                         self.loop.init_from_optimizer, self.log,
                                                         base_tokenizer=self.data.tokenizer)
        if self.loop.init_from_optimizer and self.parent_state is not None:
            try:
                self.optimizer.load_state_dict(self.parent_state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"CONFIG_INIT_FROM_OPTIMIZER: the optimizer state of {self.parent['path']} does "
                                      f"not fit this run's optimizer ({e}); use the parent's OPTIMIZER and parameter "
                                      "groups, or unset INIT_FROM_OPTIMIZER for a fresh optimizer") from None
        self.parent_state = None  # the parent's checkpoint is not kept in memory for the run
        p = self.parent
        if p["kind"] == "hf":
            self.log(f"warm start from the Hugging Face folder {p['path']}: weights, fresh optimizer, step 0")
        else:
            self.log(f"warm start from {p['path']} (step {p['step']}, val loss {p['val_loss']}): weights"
                     + (" and optimizer state" if p["optimizer"] else ", fresh optimizer") + ", step 0")

    def run(self) -> dict:
        """Train from start_step to MAX_ITERS (or MAX_TIME, a stop signal, persistent NaN/Inf)."""
        result = self._run()
        self.trackers.finish(result)
        return result

    def _run(self) -> dict:
        loop = self.loop
        active = self.model.active_params()
        self.log(f"model: {self.model.num_params(non_embedding=False):,} parameters "
                 f"({self.model.num_params():,} non-embedding"
                 + (f", {active:,} active per token" if active != self.model.num_params() else "") + "), "
                 f"vocab {self.tokenizer.vocab_size} padded to {self.model.config.vocab_size}")
        self.log(self.optimizer_description)
        if self.fp8["backend"]:
            self.log(f"fp8 ({self.fp8['backend']}): {len(self.fp8['converted'])} linear layers converted, "
                     f"kept in {self.dtype}: " + (", ".join(self.fp8["kept"]) or "none"))
        if self.curriculum.active:
            self.log(self.curriculum.describe())
        every = self.model.config.checkpoint_every
        ckpt = f"every {every} block(s)" if every else "off"
        mode = self.device_config.compile_mode
        self.log(f"device: {self.device_name}, dtype {self.dtype}, compile {f'on ({mode})' if mode else 'off'}, "
                 f"activation checkpointing {ckpt}, "
                 f"{self.tokens_per_step:,} tokens/step")
        self.speed, self.started, self.last_save = Throughput(), time.time(), self.clock()
        self.times.start()
        attempt_start = self.started  # MAX_TIME is per attempt: 'make continue' gets the same time again
        step, last_eval, stop_reason, oom = self.start_step, {}, None, None
        if self.loop.init_from and not self.resumed:  # a warm start: where the parent left off, at step 0
            self.warm_start()
            with self.speed.pause():
                last_eval = self.evaluate_and_track(0)
        self.progress.update(step)  # the bar starts at the step this attempt starts from
        with StopRequest() as stop:
            try:
                while step < loop.max_iters:
                    try:
                        with self.times.part("train"):
                            loss, grad_norm = self.train_step(step)
                    except torch.OutOfMemoryError as e:
                        # Drop the traceback: its frames hold the failed step's activations (and a cycle with
                        # this frame), which would keep the device full while the checkpoint is written.
                        oom = e.with_traceback(None)
                        break
                    self.speed.step(self.tokens_at(step))
                    step += 1
                    self.progress.update(step)
                    out_of_time = bool(loop.max_time and time.time() - attempt_start >= loop.max_time)
                    save_due = bool(loop.checkpoint_minutes and
                                    self.clock() - self.last_save >= 60 * loop.checkpoint_minutes)
                    # Ranks stop (and checkpoint) together: a signal or the clock may reach one first.
                    out_of_time, stopping, save_due = runtime.any_rank(self.dist, out_of_time, stop.requested,
                                                                       save_due)
                    finished = step == loop.max_iters
                    time_up = out_of_time and not finished
                    if stopping:
                        stop_reason = f"interrupted by {stop.name or 'a signal to another rank'}"
                    elif self.guard.should_stop:
                        stop_reason = "nonfinite"
                    ending = finished or time_up or stop_reason is not None
                    if step % loop.log_interval == 0 or ending:
                        with self.times.part("log"):
                            self.log_step(step, loss, grad_norm)
                    with self.speed.pause():
                        if (step % loop.eval_interval == 0 or finished or time_up) and stop_reason is None:
                            last_eval = self.evaluate_and_track(step)
                        on_interval = loop.checkpoint_interval and step % loop.checkpoint_interval == 0
                        if (on_interval or save_due) and not ending:
                            with self.times.part("checkpoint"):
                                self.save_checkpoint(step, last_eval.get("val"), self.elapsed())
                    if ending:
                        break
            finally:
                self.metrics.close()
                self.progress.close()
            if oom is not None:
                return self.out_of_memory(step, last_eval, oom)
            if stop_reason is None and not last_eval:  # resumed at the very end: nothing left to train
                last_eval = self.evaluate_and_track(step)
            with self.times.part("checkpoint"):
                self.save_checkpoint(step, last_eval.get("val"), self.elapsed())
        if stop_reason == "nonfinite":
            message = (f"stopped at step {step}: loss or gradient was NaN/Inf for {self.guard.in_a_row} steps in a "
                       f"row (CONFIG_MAX_BAD_STEPS={loop.max_bad_steps}); the last good weights are in the "
                       f"checkpoint. Lower LR, raise WARMUP_ITERS or set GRAD_CLIP ('make continue SET=...'); if the "
                       f"loss was climbing before the stop, those weights have diverged too: start a new run instead")
            self.log(message)
            return {"status": "failed", "error": message, "steps": step, "skipped_steps": self.guard.skipped}
        if stop_reason is not None:
            self.log(f"{stop_reason} at step {step}: checkpoint written; 'make continue' resumes the run")
            return {"status": "interrupted", "error": stop_reason, "steps": step}
        summary = self.summary(step, last_eval)
        if step < loop.max_iters:
            lr = self.lr_at(step - 1)
            warm = " (still in warmup)" if step <= self.optim.schedule.warmup_iters else ""
            message = (f"stopped by the time limit CONFIG_MAX_TIME={loop.max_time}s at step {step} of "
                       f"{loop.max_iters}, lr {lr:.3g}{warm}; checkpoint written, 'make continue' trains the rest")
            self.log(message)
            summary.update(status="time_limit", error=message)
        return summary

    def elapsed(self) -> float:
        """Seconds the run has trained: earlier attempts (from the checkpoint) and this one."""
        return self.elapsed_before + time.time() - self.started

    def clock(self) -> float:
        """Seconds on a monotonic clock, for the time-based checkpoint interval (tests replace it)."""
        return time.monotonic()

    def out_of_memory(self, step: int, last_eval: dict, error: Exception) -> dict:
        """A step ran out of device memory: keep the state before that step, and say how to fit."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.loss_parts = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        saved = "the previous checkpoint is the last good state"
        if self.updating:
            saved = "it happened while the optimizer was updating the weights, so " + saved
        elif self.dist.active:
            saved = "other ranks cannot join a checkpoint now, so " + saved
        elif step > self.start_step:
            try:
                self.save_checkpoint(step, last_eval.get("val"), self.elapsed(), self.step_start)
                saved = f"the state after step {step} is checkpointed"
            except (CheckpointError, torch.OutOfMemoryError) as e:
                saved = f"writing its checkpoint failed too ({e}), so " + saved
        message = (f"out of memory in step {step + 1} on {self.device_name}: {str(error).splitlines()[0]} "
                   f"{saved}. To fit: lower CONFIG_MICRO_BATCH={self.loop.micro_batch} and raise "
                   f"CONFIG_GRAD_ACCUM={self.loop.grad_accum} to keep the batch, or set CONFIG_ACT_CKPT=y; "
                   f"'make check' predicts {self.memory_prediction()} per device for this config. Then "
                   f"'make continue SET=\"MICRO_BATCH=...\"' resumes from the checkpoint")
        self.log(message)
        return {"status": "failed", "error": message, "steps": step, "out_of_memory": True}

    def memory_prediction(self) -> str:
        """This run's predicted peak memory per device, in words: 'make check''s predictor and layout."""
        try:
            world, shard, _ = check_layout(self.cfg, self.curriculum.grad_accum_at(0) != self.loop.grad_accum)
            trained = bool(self.post.trained_in_full) if self.post else True  # LoRA: the embedding too?
            memory = predict_run_memory(self.cfg, self.curriculum, self.model.config, self.dtype, world, shard,
                                        embedding_trained=trained)
            return f"{memory.total / 2**30:.1f} GiB"
        except Exception as e:  # advice must not hide the error it advises on
            return f"(no prediction: {type(e).__name__}: {e})"

    def log_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss_value, norm_value = loss.item(), grad_norm.item()  # the host sync of this interval
        tps = self.speed.interval()
        flops = self.flops_per_token * tps
        utilization = mfu(self.flops_per_token, tps, self.device_name)
        lr = self.lr_at(step - 1)
        extra = {name: float(value) for name, value in self.parts.items()}  # MTP and MoE loss terms
        if self.curriculum.active:
            stage = self.curriculum.stage_at(step - 1)
            extra.update(curriculum_stage=stage.index, seq_len=stage.seq_len, tokens_per_step=self.tokens_at(step - 1))
        if self.moe_stats:
            extra.update(self.moe_stats.metrics())
        record = dict(step=step, tokens=self.tokens_before(step), train_loss=loss_value, lr=lr,
                      grad_norm=norm_value, skipped_steps=self.guard.skipped, tokens_per_s=tps,
                      flops_per_s=flops, mfu=utilization, elapsed_s=self.elapsed(),
                      **({} if self.post else {"data_share": self.batches.shares(self.data.names)}),
                      **extra, **sample_system(self.device))
        self.metrics.write(**record)
        self.trackers.log(record, step)
        shown = {"mtp_loss": "mtp", "moe_aux_loss": "aux", "moe_z_loss": "z", "moe_load_max": "load max",
                 "moe_dropped_frac": "dropped", "seq_len": "seq", **DPO_SHOWN}
        self.log(f"step {step:>6}/{self.loop.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} "
                 f"| grad norm {norm_value:.3f} | {tps:,.0f} tok/s"
                 + (f" | MFU {100 * utilization:.1f}%" if utilization is not None else "")
                 + "".join(f" | {label} {extra[name]:.4g}" for name, label in shown.items() if name in extra)
                 + (f" | skipped {self.guard.skipped}" if self.guard.skipped else ""))

    def evaluate_and_track(self, step: int) -> dict[str, float]:
        """Evaluate, log, and keep checkpoints/best.pt at the lowest val loss."""
        with self.times.part("eval"):
            return self._evaluate_and_track(step)

    def _evaluate_and_track(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        if result["val"] < self.best_val:
            self.best_val, self.best_step, self.best_bpb = result["val"], step, result["val_bpb"]
            with self.times.part("checkpoint"):
                self._save(None, self.state(step, result["val"], self.elapsed()))
        record = dict(step=step, tokens=self.tokens_before(step), val_loss=result["val"],
                      train_eval_loss=result["train"], val_losses=result["val_losses"],
                      val_bpb=result["val_bpb"], val_bpbs=result["val_bpbs"], elapsed_s=self.elapsed())
        if "val_metrics" in result:  # DPO on the validation pairs: preference accuracy, rewards, margin, KL
            record.update({f"val_{name}": value for name, value in result["val_metrics"].items()})
        every = self.downstream.every
        if every and step and step >= (self.last_downstream // every + 1) * every:  # the first eval past a multiple
            record["eval"] = self.downstream_eval(step)
        self.metrics.write(**record)
        self.trackers.log(record, step)
        named = "".join(f" | {name} {loss:.4f}" for name, loss in result["val_losses"].items()
                        if list(result["val_losses"]) != ["val"])
        bpb = "" if result["val_bpb"] is None else f" | val bpb {result['val_bpb']:.4f}"
        dpo = "".join(f" | {label} {result['val_metrics'][name]:.4f}" for name, label in DPO_SHOWN.items()
                      if name in result.get("val_metrics", {}))
        self.log(f"eval step {step}: train {result['train']:.4f} | val {result['val']:.4f}{named}{bpb}{dpo}")
        return result

    def downstream_eval(self, step: int) -> dict[str, dict[str, float]]:
        """EVAL_TASKS on the live model (every rank runs them alike; sharded weights need all): {task: {metric:
        value}}, logged under eval/<task>/<metric>."""
        from harness.adapter import OurLM
        from harness.evaluate import run_tasks

        self.model.eval()
        try:
            lm = OurLM(self.model, self.tokenizer, self.downstream.batch_size, self.device)
            metrics, _ = run_tasks(lm, self.downstream, log=lambda message: None)
        finally:
            self.model.train()
        self.last_downstream = step
        scores = {task: {k: v for k, v in m.items() if isinstance(v, float)} for task, m in metrics.items()}
        shown = " | ".join(f"{task} {k} {v:.4f}" for task, m in scores.items() for k, v in m.items()
                           if not k.endswith("_stderr"))
        self.log(f"eval step {step}: {shown}")
        return scores

    def summary(self, step: int, last_eval: dict) -> dict:
        saved = checkpoint.step_paths(self.run_dir)  # the final step's checkpoint is written just before
        if self.dist.main and saved:
            self.log(provenance(self.run_dir, saved[-1], step, self.loop.max_iters, self.best_step, self.best_val))
        with self.times.part("sample"):
            sample = generate_text(self.model, self.tokenizer, self.loop.sample, self.device,
                                   progress=None if self.dist.main and self.cfg.PROGRESS_BAR else False)
        if self.dist.main:
            (self.run_dir / "samples.txt").write_text(sample + "\n", encoding="utf-8")
        tokens_per_s = self.speed.average
        flops_per_token = self.flops_per_token
        if self.dist.main:
            self.log(self.times.describe())
        return {
            "status": "done",
            "steps": step,
            "planned_steps": self.loop.max_iters,
            "final_lr": self.lr_at(step - 1),
            "tokens": self.tokens_before(step),
            "final_train_loss": last_eval["train"],
            "final_val_loss": last_eval["val"],
            "final_val_losses": last_eval["val_losses"],
            "best_val_loss": self.best_val,
            "best_val_step": self.best_step,
            "final_val_bpb": last_eval["val_bpb"],
            "final_val_bpbs": last_eval["val_bpbs"],
            "best_val_bpb": self.best_bpb,
            "init_from": self.parent,
            **({"post_training": self.post.summary()} if self.post else {}),
            "skipped_steps": self.guard.skipped,
            "unigram_entropy_nats": self.data.manifest["unigram_entropy_nats"],
            "tokens_per_s": tokens_per_s,
            "flops_per_s": flops_per_token * tokens_per_s,
            "mfu": mfu(flops_per_token, tokens_per_s, self.device_name),
            "params": self.model.num_params(non_embedding=False),
            "params_non_embedding": self.model.num_params(),
            "params_active": self.model.active_params(),
            "wall_time_s": self.elapsed(),
            "time_split": self.times.summary(),  # this attempt's seconds: train, eval, checkpoint, log, sample, other
            "device": self.device_name,
            "parallel": self.dist.engine,
            "world_size": self.dist.world_size,
            "dtype": self.dtype,
            **({} if self.post else {"data_share": self.batches.shares(self.data.names)}),
            "data": self.data.summary(),
            "sample": sample,
        }


def write_summary(run_dir: Path, summary: dict) -> None:
    from kconfig.atomic import write_text_if_changed

    write_text_if_changed(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
