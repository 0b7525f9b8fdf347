"""The training loop: one run, from a resolved configuration to a checkpoint and summary."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.loader import Batches
from data.prepare import PreparedData
from model.gpt import GPT, ModelConfig
from optim.optimizers import build_optimizer, describe
from optim.schedule import lr_at
from train import checkpoint
from train.device import autocast, device_name, resolve_device, resolve_dtype, setup_backend
from train.metrics import MetricsLog, mfu
from train.sample import generate_text


def padded_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg, vocab_size: int, device: torch.device) -> GPT:
    return GPT(ModelConfig.from_config(cfg, padded_vocab(vocab_size))).to(device)


class Trainer:
    def __init__(self, cfg, data: PreparedData, run_dir: Path, log=print):
        self.cfg, self.data, self.run_dir, self.log = cfg, data, Path(run_dir), log
        self.device = resolve_device(cfg)
        setup_backend(cfg, self.device)
        self.dtype = resolve_dtype(cfg, self.device)
        self.device_name = device_name(self.device)
        seed_everything(cfg.SEED)
        self.tokenizer = data.tokenizer
        self.model = build_model(cfg, self.tokenizer.vocab_size, self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        self.forward = torch.compile(self.model) if cfg.COMPILE else self.model
        self.batches = Batches(data, "train", cfg.MICRO_BATCH, cfg.BLOCK_SIZE, self.device, cfg.SEED)
        # Evaluation reuses the same batches every time (fixed seed), so curves compare across steps and runs.
        self.eval_sets = {split: Batches(data, split, cfg.MICRO_BATCH, cfg.BLOCK_SIZE, self.device, cfg.SEED + 1)
                          for split in ("train", "val")}
        self.tokens_per_step = cfg.MICRO_BATCH * cfg.GRAD_ACCUM * cfg.BLOCK_SIZE
        self.start_step, self.best_val, self.best_step, self.elapsed_before = 0, float("inf"), 0, 0.0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out = {}
        for split, batches in self.eval_sets.items():
            batches.reset()
            total = torch.zeros((), device=self.device)
            for _ in range(self.cfg.EVAL_BATCHES):
                x, y = batches.next()
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(x, y)
                total += loss.float()
            out[split] = (total / self.cfg.EVAL_BATCHES).item()
        self.model.train()
        return out

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over GRAD_ACCUM micro-batches. Returns (loss, grad norm) as device tensors."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.GRAD_ACCUM):
            x, y = self.batches.next()
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            loss = loss / cfg.GRAD_ACCUM
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.GRAD_CLIP if cfg.GRAD_CLIP > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def save_checkpoint(self, step: int, val_loss: float | None, elapsed: float) -> None:
        checkpoint.save(self.run_dir / checkpoint.CHECKPOINT, {
            "format": 1,
            "step": step,
            "tokens": step * self.tokens_per_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_config": asdict(self.model.cfg),
            "tokenizer": self.tokenizer.spec,
            "config": dict(self.cfg),
            "val_loss": val_loss,
            "best_val_loss": self.best_val,
            "best_val_step": self.best_step,
            "wall_time_s": elapsed,
            "data_rng": self.batches.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        })

    def resume(self) -> None:
        """Continue from the run directory's checkpoint: weights, optimizer, step, data position, RNG."""
        state = checkpoint.load(self.run_dir / checkpoint.CHECKPOINT)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.start_step, self.elapsed_before = state["step"], state["wall_time_s"]
        self.best_val, self.best_step = state["best_val_loss"], state["best_val_step"]
        metrics = self.run_dir / "metrics.jsonl"  # drop what the interrupted attempt logged after the checkpoint
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.start_step]
            metrics.write_text("".join(line + "\n" for line in kept))
        self.log(f"resumed from step {self.start_step} ({self.start_step * self.tokens_per_step:,} tokens)")

    def run(self) -> dict:
        cfg, log = self.cfg, self.log
        n_params = self.model.num_params(non_embedding=False)
        flops_per_token = self.model.flops_per_token()
        log(f"model: {n_params:,} parameters ({self.model.num_params():,} non-embedding), "
            f"vocab {self.tokenizer.vocab_size} padded to {self.model.cfg.vocab_size}")
        log(describe(self.optimizer))
        log(f"device: {self.device_name}, dtype {self.dtype}, compile {'on' if cfg.COMPILE else 'off'}, "
            f"{self.tokens_per_step:,} tokens/step")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        last_eval = {}
        train_time, interval_steps = 0.0, 0
        start = time.time() - self.elapsed_before
        interval_start, paused = time.perf_counter(), 0.0  # paused: eval and checkpoint time, not counted
        step = self.start_step
        try:
            while step < cfg.MAX_ITERS:
                loss, grad_norm = self.train_step(step)
                step += 1
                interval_steps += 1
                is_last = step == cfg.MAX_ITERS or bool(cfg.MAX_TIME and time.time() - start >= cfg.MAX_TIME)
                if step % cfg.LOG_INTERVAL == 0 or is_last:
                    loss_value, norm_value = loss.item(), grad_norm.item()  # the only host sync per interval
                    elapsed = time.perf_counter() - interval_start - paused
                    train_time += elapsed
                    tps = interval_steps * self.tokens_per_step / elapsed
                    utilization = mfu(flops_per_token, tps, self.device_name)
                    lr = lr_at(step - 1, cfg)
                    metrics.write(step=step, tokens=step * self.tokens_per_step, train_loss=loss_value,
                                  lr=lr, grad_norm=norm_value, tokens_per_s=tps,
                                  flops_per_s=flops_per_token * tps, mfu=utilization,
                                  elapsed_s=time.time() - start)
                    log(f"step {step:>6}/{cfg.MAX_ITERS} | loss {loss_value:.4f} | lr {lr:.2e} "
                        f"| grad norm {norm_value:.3f} | {tps:,.0f} tok/s"
                        + (f" | MFU {100 * utilization:.1f}%" if utilization is not None else ""))
                    interval_steps, paused = 0, 0.0
                    interval_start = time.perf_counter()
                pause_start = time.perf_counter()
                if step % cfg.EVAL_INTERVAL == 0 or is_last:
                    last_eval = self.evaluate()
                    if last_eval["val"] < self.best_val:
                        self.best_val, self.best_step = last_eval["val"], step
                    metrics.write(step=step, tokens=step * self.tokens_per_step, val_loss=last_eval["val"],
                                  train_eval_loss=last_eval["train"], elapsed_s=time.time() - start)
                    log(f"eval step {step}: train {last_eval['train']:.4f} | val {last_eval['val']:.4f}")
                if cfg.CHECKPOINT_INTERVAL and step % cfg.CHECKPOINT_INTERVAL == 0 and not is_last:
                    self.save_checkpoint(step, last_eval.get("val"), time.time() - start)
                paused += time.perf_counter() - pause_start
                if is_last:
                    break
        finally:
            metrics.close()
        if not last_eval:  # resumed at the very end: nothing left to train
            last_eval = self.evaluate()
            self.best_val = min(self.best_val, last_eval["val"])
        self.save_checkpoint(step, last_eval.get("val"), time.time() - start)
        sample = generate_text(self.model, self.tokenizer, cfg.SAMPLE_PROMPT, cfg.SAMPLE_TOKENS,
                               cfg.SAMPLE_TEMPERATURE, cfg.SAMPLE_TOP_K, self.device, cfg.SEED)
        (self.run_dir / "samples.txt").write_text(sample + "\n", encoding="utf-8")
        tokens_per_s = (step - self.start_step) * self.tokens_per_step / train_time if train_time else 0.0
        return {
            "status": "done",
            "steps": step,
            "tokens": step * self.tokens_per_step,
            "final_train_loss": last_eval["train"],
            "final_val_loss": last_eval["val"],
            "best_val_loss": self.best_val,
            "best_val_step": self.best_step,
            "unigram_entropy_nats": self.data.manifest["unigram_entropy_nats"],
            "tokens_per_s": tokens_per_s,
            "flops_per_s": flops_per_token * tokens_per_s,
            "mfu": mfu(flops_per_token, tokens_per_s, self.device_name),
            "params": n_params,
            "params_non_embedding": self.model.num_params(),
            "wall_time_s": time.time() - start,
            "device": self.device_name,
            "dtype": self.dtype,
            "data": {"path": str(self.data.path), "sha256": self.data.manifest["sha256"],
                     "tokenizer_sha256": self.data.manifest["tokenizer"]["sha256"]},
            "sample": sample,
        }


def write_summary(run_dir: Path, summary: dict) -> None:
    from kbuild.kconfig import write_text_if_changed

    write_text_if_changed(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
