"""Checkpoints: rotation and best, exact resume after a real SIGTERM, corrupt files, full disks,
mismatched models, and NaN/Inf steps."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data.prepare import prepare
from kconfig.tree import ROOT, parse_overrides, resolve, write_outputs
from kconfig.values import values
from train import checkpoint
from train.checkpoint import CheckpointError
from train.trainer import Trainer

SETTINGS = ("MODEL_SIZE_CUSTOM=y N_LAYER=2 N_HEAD=2 N_EMBD=64 BLOCK_SIZE=32 MICRO_BATCH=8 WARMUP_ITERS=2 "
            "LR=3e-3 MIN_LR=3e-4 EVAL_BATCHES=2 LOG_INTERVAL=5 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=5 "
            'DROPOUT="0.1" CPU_THREADS=1')


def corpus(tmp_path):
    lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox", "owl") for b in ("one", "two", "six")]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 120) + "\n")


def configure(tmp_path, run_dir, extra=""):
    """Write a run directory's .config as the runner would."""
    corpus(tmp_path)
    where = f'DATA_PATH="{tmp_path / "corpus.txt"}" DATA_CACHE_DIR="{tmp_path / "cache"}"'
    kconf, _ = resolve(parse_overrides(f"{SETTINGS} {where}"), parse_overrides(extra, "extra"))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(kconf, run_dir / ".config", run_dir / "config.py")
    return values(kconf)


def trainer(tmp_path, run_dir, extra=""):
    cfg = configure(tmp_path, run_dir, extra)
    return Trainer(cfg, prepare(cfg, ROOT, log=lambda m: None), run_dir, log=lambda m: None)


def train_process(run_dir, *flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "train", str(run_dir), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r and r["step"] % 5 == 0}


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    extra = "MAX_ITERS=120 EVAL_INTERVAL=40"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    configure(tmp_path, whole, extra)
    configure(tmp_path, parts, extra)
    assert train_process(whole).wait() == 0
    proc = train_process(parts)
    deadline = time.time() + 120
    while time.time() < deadline:  # let it train past step 30, then preempt it
        metrics = parts / "metrics.jsonl"
        if metrics.exists() and max(train_losses(parts) or [0]) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by SIGTERM"
    stopped_at = summary["steps"]
    assert 30 <= stopped_at < 120 and checkpoint.latest(parts)[1]["step"] == stopped_at
    assert train_process(parts, "--resume").wait() == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, parts))
    assert b["status"] == "done" and b["steps"] == 120
    assert (a["final_val_loss"], a["final_train_loss"]) == (b["final_val_loss"], b["final_train_loss"])
    assert train_losses(whole) == train_losses(parts), "every logged loss, before and after the stop"
    assert "resumed from step" in (parts / "train.log").read_text()


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    run_dir = tmp_path / "run"
    summary = trainer(tmp_path, run_dir, "MAX_ITERS=50 CHECKPOINT_INTERVAL=10 CHECKPOINT_KEEP=2 "
                                         "EVAL_INTERVAL=10").run()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000040.pt", "step-00000050.pt"]
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert best["step"] == summary["best_val_step"] and best["val_loss"] == summary["best_val_loss"]


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    trainer(tmp_path, run_dir, "MAX_ITERS=20 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10").run()
    newest = run_dir / "checkpoints" / "step-00000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-00000020.pt"):
        path, state = checkpoint.latest(run_dir)
    assert path.name == "step-00000010.pt" and state["step"] == 10
    t, said = trainer(tmp_path, run_dir, "MAX_ITERS=20 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10"), []
    t.log = said.append
    t.resume()  # the warning goes to the run's log
    assert t.start_step == 10 and said[0].startswith("warning: skipping unreadable checkpoint")
    for p in (run_dir / "checkpoints").glob("step-*.pt"):
        p.write_bytes(b"PK\3\4")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint \(step-00000020.pt: RuntimeError: "
                                              r"PytorchStreamReader failed reading zip archive: not a ZIP archive; "
                                              r"step-00000010.pt: "):
        t.resume()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, "MAX_ITERS=10 EVAL_INTERVAL=10")
    t.run()
    good = (run_dir / "checkpoints" / "step-00000010.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*step-00000011.pt: no space left on the device .*MiB free there"):
        checkpoint.save_step(run_dir, 11, {"x": 1}, keep=2)
    assert (run_dir / "checkpoints" / "step-00000010.pt").read_bytes() == good
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "step-00000010.pt"]


def test_resuming_with_a_different_model_names_the_symbols(tmp_path):
    run_dir = tmp_path / "run"
    trainer(tmp_path, run_dir, "MAX_ITERS=5 EVAL_INTERVAL=5").run()
    other = trainer(tmp_path, run_dir, "MAX_ITERS=5 EVAL_INTERVAL=5 N_LAYER=3 QK_NORM=y")
    with pytest.raises(CheckpointError, match=r"different model; differing symbols: CONFIG_N_LAYER: "
                                              r"checkpoint 2, configuration 3; CONFIG_QK_NORM: checkpoint False"):
        other.resume()


def poison(t, bad_steps):
    """Make the loss NaN on the given (0-based) optimizer steps."""
    calls = {"n": 0}
    forward = t.forward

    def wrapped(x, y):
        logits, loss = forward(x, y)
        step = calls["n"]
        calls["n"] += 1
        return logits, (loss * float("nan") if step in bad_steps else loss)

    t.forward = wrapped


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    t = trainer(tmp_path, tmp_path / "run", "MAX_ITERS=20 EVAL_INTERVAL=1000 EVAL_BATCHES=1")
    poison(t, {3, 4, 7})
    before = {}

    def snapshot():
        return {n: p.detach().clone() for n, p in t.model.named_parameters()}

    for step in range(6):
        if step == 3:
            before = snapshot()
        t.train_step(step)
        if step == 4:
            assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters()), "skipped: unchanged"
    assert t.guard.skipped == 2


def test_persistent_nonfinite_loss_stops_with_the_last_good_state(tmp_path):
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, "MAX_ITERS=50 EVAL_INTERVAL=1000 EVAL_BATCHES=1 MAX_BAD_STEPS=3")
    poison(t, set(range(10, 100)))
    summary = t.run()
    assert summary["status"] == "failed" and summary["steps"] == 13 and summary["skipped_steps"] == 3
    assert "NaN/Inf for 3 steps in a row (CONFIG_MAX_BAD_STEPS=3)" in summary["error"]
    path, state = checkpoint.latest(run_dir)
    assert state["step"] == 13 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_fp8_into_or_out_of_transformer_engine_is_another_model_for_old_checkpoints_too():
    from conftest import config_of
    from kconfig.tree import new_kconfig
    from train.state import incompatibilities, te_layers

    plain, te = config_of("DEVICE_CUDA=y"), config_of("DEVICE_CUDA=y FP8_TE=y")
    torchao = config_of("DEVICE_CUDA=y FP8_TORCHAO=y")
    choices = set(new_kconfig().named_choices)
    older = {name: value for name, value in dict(te).items() if name not in choices}  # before choice values
    assert [te_layers(c) for c in (plain, torchao, te, older)] == [False, False, True, True]
    assert incompatibilities(dict(torchao), plain) == [], "torchao's Float8Linear keeps the parameter names"
    moved = ['CONFIG_FP8: only the checkpoint uses TransformerEngine\'s layers (FP8 "te"), which store the '
             'weights under other names']
    assert incompatibilities(dict(te), plain) == incompatibilities(older, plain) == moved
    assert incompatibilities(dict(plain), te) == [moved[0].replace("checkpoint", "configuration")]
    assert incompatibilities({k: v for k, v in dict(plain).items() if k not in choices}, plain) == []


def test_a_checkpoint_from_before_a_new_model_option_stays_compatible(config):
    """A checkpoint's config lacks a model symbol added since (MLP_GEGLU): it had the default, so a
    run that keeps the default resumes, and one that selects the new option is refused by name."""
    from train.state import incompatibilities

    saved = dict(config("MLP_SWIGLU=y"))
    del saved["MLP_GEGLU"], saved["MLP"]  # written by a tree without GEGLU and without choice values
    assert incompatibilities(saved, config("MLP_SWIGLU=y")) == []
    problems = incompatibilities(saved, config("MLP_GEGLU=y"))
    assert any(p.startswith("CONFIG_MLP_GEGLU: checkpoint False (its default") for p in problems)
    assert any(p.startswith("CONFIG_MLP_SWIGLU: checkpoint True") for p in problems)
