"""What one training step and one evaluation compute, where a bug keeps the loss plausible:
accumulation's gradient scale (batch warmup too), clipping's bound on the step, each group's LR, evaluation's
mode (downstream tasks too) and its data split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import config_of
from data.prepare import prepare
from train.trainer import Trainer

SETTINGS = ("DATA_PATH=corpus.txt DATA_CACHE_DIR=cache MODEL_SIZE_CUSTOM=y N_LAYER=2 N_HEAD=2 N_EMBD=64 "
            "BLOCK_SIZE=32 MICRO_BATCH=16 MAX_ITERS=60 WARMUP_ITERS=5 LR=3e-3 MIN_LR=3e-4 EVAL_INTERVAL=30 "
            "EVAL_BATCHES=4 LOG_INTERVAL=10 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=20 SEED=5")


def make_corpus(path):
    # Random letters: no window of the training split recurs in the validation split, so a
    # batch tells which split it came from.
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 7))) for _ in range(6000)]
    path.write_text(" ".join(words) + "\n")


def trainer_for(tmp_path, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "corpus.txt").exists():
        make_corpus(tmp_path / "corpus.txt")
    cfg = config_of(SETTINGS, extra)
    (tmp_path / "run").mkdir(exist_ok=True)
    data = prepare(cfg, tmp_path, log=lambda m: None)
    return Trainer(cfg, data, tmp_path / "run", log=lambda m: None), data


def test_accumulated_micro_batches_give_the_large_batch_gradient_norm(tmp_path):
    # 16 sequences at once and 2 x 8 accumulated: the same mean loss, so the same gradient. AdamW's
    # update is nearly scale-invariant, so weights alone hide a gradient summed instead of averaged.
    big, _ = trainer_for(tmp_path, "MICRO_BATCH=16 GRAD_ACCUM=1 GRAD_CLIP=0")
    acc, _ = trainer_for(tmp_path, "MICRO_BATCH=8 GRAD_ACCUM=2 GRAD_CLIP=0")
    for step in range(2):
        loss_big, norm_big = big.train_step(step)
        loss_acc, norm_acc = acc.train_step(step)
        assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-5)
        assert norm_acc.item() == pytest.approx(norm_big.item(), rel=1e-4), step


def norm_at_each_step(trainer) -> list[float]:
    """The total gradient norm the optimizer sees each time it steps (a pre-step hook)."""
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("clip", ["0.05", "0"])
def test_the_optimizer_steps_with_the_norm_clipped_to_grad_clip(tmp_path, clip):
    # The first steps' gradient norm is about 3 here (asserted > 0.3), so GRAD_CLIP=0.05 binds at every step;
    # GRAD_CLIP=0 (off) leaves the gradient as it was.
    trainer, _ = trainer_for(tmp_path, f'GRAD_CLIP="{clip}"')
    seen = norm_at_each_step(trainer)
    raw = [trainer.train_step(step)[1].item() for step in range(3)]
    assert len(seen) == 3 and min(raw) > 0.3
    want = [float(clip)] * 3 if float(clip) else raw
    assert seen == pytest.approx(want, rel=1e-4)


def test_a_grad_clip_above_the_norm_changes_nothing(tmp_path):
    trainer, _ = trainer_for(tmp_path, 'GRAD_CLIP="1000"')
    seen = norm_at_each_step(trainer)
    raw = [trainer.train_step(step)[1].item() for step in range(2)]
    assert seen == pytest.approx(raw, rel=1e-5)


def test_evaluation_runs_without_dropout_and_returns_to_training_mode(tmp_path):
    # Dropout 0.3: in training mode two evaluations would draw different masks and differ.
    trainer, _ = trainer_for(tmp_path, 'DROPOUT="0.3" EVAL_BATCHES=2')
    trainer.train_step(0)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    assert first["val"] == second["val"] and first["train"] == second["train"]
    # The same number by hand: the model in eval mode on the validation split's fixed batches.
    trainer.model.eval()
    batches = trainer.val_sets["val"]
    batches.reset()
    with torch.no_grad():
        by_hand = sum(trainer.model(*batches.next())[1].item() for _ in range(2)) / 2
    assert first["val"] == pytest.approx(by_hand, rel=1e-6)
    trainer.model.train()
    x, y = trainer.val_sets["val"].next()
    a, b = trainer.model(x, y)[1].item(), trainer.model(x, y)[1].item()
    assert a != b, "dropout is active again after evaluation"


def windows_of(tokens: np.ndarray, length: int) -> set[bytes]:
    """Every contiguous window of ``length`` ids of a split, as bytes (for set membership)."""
    view = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), length)
    return {row.tobytes() for row in view}


def test_validation_batches_come_from_the_val_split_and_training_ones_from_train(tmp_path):
    trainer, data = trainer_for(tmp_path)
    val, train = data.tokens("val"), data.tokens("train")
    assert np.array_equal(trainer.val_sets["val"].tokens, val)
    val_windows, train_windows = windows_of(val, 33), windows_of(train, 33)
    assert not val_windows & train_windows  # the corpus keeps the splits apart
    batches = trainer.val_sets["val"]
    batches.reset()
    for _ in range(trainer.loop.eval_batches):
        x, y = batches.next()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.int64)
        assert all(row.tobytes() in val_windows for row in rows)
    # What evaluation scores as "train" and what the steps train on are training windows.
    for source in (trainer.eval_train, trainer.batches):
        x, y = source.next()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.int64)
        assert all(row.tobytes() in train_windows for row in rows)
    assert math.isfinite(trainer.evaluate()["val"])


def scheduled_lr(step: int) -> float:
    """SETTINGS' schedule by hand: LR 3e-3 reached linearly over 5 warmup steps, then cosine to MIN_LR
    3e-4 at step 60."""
    if step < 5:
        return 3e-3 * (step + 1) / 5
    return 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (step - 5) / 55))


def lrs_stepped_with(trainer, steps: int) -> list[dict[str, float]]:
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append({g["name"]: g["lr"] for g in optimizer.param_groups}))
    for step in range(steps):
        trainer.train_step(step)
    return seen


def test_each_group_steps_at_the_schedules_lr_times_its_scale(tmp_path):
    trainer, _ = trainer_for(tmp_path, 'EMBEDDING_LR_SCALE="2"')
    seen = lrs_stepped_with(trainer, 8)
    assert [set(s) for s in seen] == [{"matrices", "embeddings", "vectors"}] * 8  # tied: no head group
    for step, lrs in enumerate(seen):
        assert lrs["matrices"] == pytest.approx(scheduled_lr(step), rel=1e-9) == lrs["vectors"]
        assert lrs["embeddings"] == pytest.approx(2 * scheduled_lr(step), rel=1e-9)


def test_a_smaller_warmup_step_gets_the_curriculum_lr_rule(tmp_path):
    # Steps 0-2 of batch warmup run 1 of 4 micro-batches: a quarter of the tokens, so sqrt(1/4) of the LR.
    trainer, _ = trainer_for(tmp_path, 'MICRO_BATCH=8 GRAD_ACCUM=4 BATCH_WARMUP_FRACTION="0.5" '
                                       'BATCH_WARMUP_START="0.25" CURRICULUM_LR_SQRT=y')
    seen = lrs_stepped_with(trainer, 3)
    assert [lrs["matrices"] for lrs in seen] == pytest.approx([0.5 * scheduled_lr(s) for s in range(3)], rel=1e-9)


def test_a_batch_warmup_step_averages_over_its_own_micro_batches(tmp_path):
    # Batch warmup: step 0 of GRAD_ACCUM=4 from 0.25 runs one micro-batch, the same 8 sequences a
    # GRAD_ACCUM=1 run draws first: its loss and gradient are that run's, not a quarter of them.
    warm, _ = trainer_for(tmp_path, 'MICRO_BATCH=8 GRAD_ACCUM=4 BATCH_WARMUP_FRACTION="0.5" '
                                    'BATCH_WARMUP_START="0.25" GRAD_CLIP=0')
    plain, _ = trainer_for(tmp_path, "MICRO_BATCH=8 GRAD_ACCUM=1 GRAD_CLIP=0")
    assert warm.curriculum.grad_accum_at(0) == 1
    (loss_warm, norm_warm), (loss_plain, norm_plain) = warm.train_step(0), plain.train_step(0)
    assert loss_warm.item() == pytest.approx(loss_plain.item(), rel=1e-6)
    assert norm_warm.item() == pytest.approx(norm_plain.item(), rel=1e-5)


@pytest.mark.parametrize("fails", [False, True])
def test_downstream_tasks_see_the_model_in_eval_mode_and_training_resumes_after(tmp_path, monkeypatch, fails):
    import harness.evaluate

    trainer, _ = trainer_for(tmp_path, 'DROPOUT="0.3"')
    modes = []

    def run_tasks(lm, config, log):
        modes.append((lm.model.training, all(not m.training for m in lm.model.modules())))
        if fails:
            raise RuntimeError("task failed")
        return {"task": {"acc": 0.5, "alias": "task"}}, None

    monkeypatch.setattr(harness.evaluate, "run_tasks", run_tasks)
    if fails:
        with pytest.raises(RuntimeError):
            trainer.downstream_eval(4)
    else:
        assert trainer.downstream_eval(4) == {"task": {"acc": 0.5}} and trainer.last_downstream == 4
    assert modes == [(False, True)] and all(m.training for m in trainer.model.modules())
