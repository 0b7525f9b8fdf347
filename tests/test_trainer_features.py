"""The trainer with the composable features: curriculum stages and batch warmup (tokens, metrics,
exact resume into the right stage), MoE metrics and balancing, multi-token prediction, FP8 emulation."""

from __future__ import annotations

import json

import torch

from tests.test_checkpoint import trainer
from tests.test_trackers import FAKE_KEY, quiet_wandb, read_wandb_records  # noqa: F401 (fixture)
from train import checkpoint

SCHEDULE = ('CURRICULUM=y CURRICULUM_STAGES="8:0 16:0.25 32:0.5" GRAD_ACCUM=2 BATCH_WARMUP_FRACTION="0.2" '
            'BATCH_WARMUP_START="0.5" DROPOUT="0"')
CURRICULUM = SCHEDULE + " MAX_ITERS=40 EVAL_INTERVAL=20 CHECKPOINT_INTERVAL=20 CHECKPOINT_KEEP=2"


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_curriculum_stages_keep_tokens_per_step_and_resume_in_the_right_stage(tmp_path):
    whole = trainer(tmp_path, tmp_path / "whole", CURRICULUM)
    summary = whole.run()
    steps = [r for r in records(tmp_path / "whole") if "train_loss" in r]
    # MICRO_BATCH=8 x BLOCK_SIZE=32 x GRAD_ACCUM=2 = 512 tokens per step once the warmup (steps 0-7,
    # one micro-batch) is over; the stages trade sequence length for micro-batch size.
    assert [(r["step"], r["seq_len"], r["tokens_per_step"]) for r in steps] == [
        (5, 8, 256), (10, 8, 512), (15, 16, 512), (20, 16, 512), (25, 32, 512), (30, 32, 512), (35, 32, 512),
        (40, 32, 512)]  # step n is the n-th step, index n-1: stage 2 starts at index 10, the 11th step
    assert [r["curriculum_stage"] for r in steps] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert summary["tokens"] == 8 * 256 + 32 * 512 == steps[-1]["tokens"]
    assert summary["final_val_loss"] < steps[0]["train_loss"]
    assert checkpoint.load(tmp_path / "whole" / "checkpoints" / "step-00000020.pt")["curriculum_stage"] == 2

    # Resume from step 20 (stage 2's last step done; step 21 starts stage 3): the rest is bit-identical.
    parted = trainer(tmp_path, tmp_path / "parted", CURRICULUM)
    parted.run()
    (tmp_path / "parted" / "checkpoints" / "step-00000040.pt").unlink()
    resumed = trainer(tmp_path, tmp_path / "parted", CURRICULUM)
    resumed.resume()
    assert resumed.start_step == 20
    resumed.run()
    after = [r for r in records(tmp_path / "parted") if "train_loss" in r]
    assert [(r["step"], r["train_loss"], r["seq_len"]) for r in after] == \
        [(r["step"], r["train_loss"], r["seq_len"]) for r in steps]


def test_moe_and_mtp_runs_log_their_terms_and_balance_experts(tmp_path):
    t = trainer(tmp_path, tmp_path / "run", 'MOE=y MOE_EXPERTS=4 MOE_TOP_K=2 MOE_BIAS_RATE="0.01" '
                                              'MOE_CAPACITY_FACTOR="1.0" MTP_HEADS=1 ACT_CKPT=y MAX_ITERS=20 '
                                              'EVAL_INTERVAL=20')
    summary = t.run()
    steps = [r for r in records(tmp_path / "run") if "train_loss" in r]
    last = steps[-1]
    assert {"mtp_loss", "moe_aux_loss", "moe_z_loss", "moe_load", "moe_load_max", "moe_dropped_frac"} <= set(last)
    assert len(last["moe_load"]) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in last["moe_load"])
    assert last["moe_load_max"] >= 1.0 and 0 <= last["moe_dropped_frac"] < 1
    assert last["moe_aux_loss"] >= 1.0 - 1e-4
    assert summary["params_active"] < summary["params_non_embedding"]
    biases = [m.expert_bias for m in t.model.moe_layers]
    assert all(b.abs().sum() > 0 for b in biases), "aux-loss-free balancing moved the expert biases"
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-00000020.pt")["model"]
    assert torch.equal(saved["blocks.0.mlp.expert_bias"], biases[0])


def test_fp8_emulated_run_trains(tmp_path):
    t = trainer(tmp_path, tmp_path / "run", "FP8_TORCHAO=y FP8_EMULATE=y MAX_ITERS=30 EVAL_INTERVAL=30")
    summary = t.run()
    assert t.fp8["backend"] == "torchao" and "lm_head" not in t.fp8["converted"]
    assert type(t.model.blocks[0].attn.c_attn).__name__ == "Float8Linear"
    first = next(r for r in records(tmp_path / "run") if "train_loss" in r)
    assert summary["final_val_loss"] < 0.8 * first["train_loss"]


def test_compile_sees_one_shape_per_curriculum_stage(tmp_path, monkeypatch):
    import functools

    import torch._dynamo

    # The eager backend keeps dynamo's graph capture and guards (what decides recompiles) without
    # inductor's code generation, which takes minutes on 2 CPU cores.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    t = trainer(tmp_path, tmp_path / "run", SCHEDULE + " COMPILE=y MAX_ITERS=24 EVAL_INTERVAL=24")
    t.run()
    assert len(t.curriculum.shapes()) == 3
    # One graph per training shape (3 stages) and one for evaluation (eval mode, full length);
    # 24 steps never recompile.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_wandb_offline_run_has_metrics_and_config_and_no_secret(tmp_path, quiet_wandb):  # noqa: F811
    import pytest

    pytest.importorskip("wandb")
    t = trainer(tmp_path, tmp_path / "plan" / "run", "TRACK_WANDB=y MAX_ITERS=10 EVAL_INTERVAL=10")
    t.run()
    import wandb

    wandb.teardown()
    (wandb_file,) = (tmp_path / "plan" / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group) == ("run", "plan")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["MAX_ITERS"] == 10 and config["TRACK_WANDB"] is True
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history if "train/loss" in h] == [5, 10]  # the trackers' names (TRACKER_KEYS)
    assert any("val/loss" in h for h in history) and all(h.get("system/cpu_rss_gib", 1) > 0 for h in history)
    assert [h["tokens"] for h in history if "train/loss" in h] == [t.tokens_before(5), t.tokens_before(10)]
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
