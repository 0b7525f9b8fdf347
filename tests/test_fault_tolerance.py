"""Faults a cluster produces, as the user meets them: a trainer killed with SIGKILL (the out-of-memory
killer, a lost node), a failed or time-limited run continued, a full disk during a checkpoint write, a
torn metrics line, a CUDA out-of-memory step, and the time-based checkpoint interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_make
from plan import runner
from plan.plan import Plan
from train import checkpoint
from train.checkpoint import CheckpointError
from train.metrics import MetricsError, keep_until
from test_checkpoint import configure, train_losses, trainer

TINY = ("MODEL_SIZE_CUSTOM=y N_LAYER=2 N_HEAD=2 N_EMBD=64 BLOCK_SIZE=64 MICRO_BATCH=8 MAX_TIME=0 "
        "EVAL_BATCHES=2 SAMPLE_TOKENS=5 WARMUP_ITERS=10 CHECKPOINT_KEEP=2")


def plans(runs: Path) -> list[Path]:
    return sorted(runs.glob("*/plan.json"), key=lambda p: json.loads(p.read_text())["created"] + p.parent.name)


def logged_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def trainer_pids(run_dir: Path) -> list[int]:
    """Processes running 'python -m train <run_dir>' (the trainer alone, not the runner or make)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"train" in argv and str(run_dir).encode() in argv:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_sigkill_of_the_trainer_then_continue_ends_on_the_same_losses(repo):
    """The issue's reproduction: kill the trainer alone with SIGKILL once step 60 is checkpointed."""
    settings = f"{TINY} MAX_ITERS=400 CHECKPOINT_INTERVAL=20 EVAL_INTERVAL=100 LOG_INTERVAL=10"
    run_make(repo, "defconfig-quickstart")
    run_make(repo, env={"SET": settings})  # the uninterrupted reference
    whole = plans(repo / "runs")[0].parent / "base"
    proc = subprocess.Popen(["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}"],
                            cwd=repo, env=dict(os.environ, SET=settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, run_dir = time.time() + 180, None
    while time.time() < deadline:
        found = [p for p in plans(repo / "runs") if p.parent != whole.parent]
        run_dir = found[0].parent / "base" if found else None
        if run_dir and (run_dir / "checkpoints" / "step-00000060.pt").exists() and trainer_pids(run_dir):
            break
        time.sleep(0.02)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run never reached its step-60 checkpoint")
    for pid in trainer_pids(run_dir):
        os.kill(pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    record = json.loads((run_dir.parent / "plan.json").read_text())["runs"][0]
    if record["status"] == "done":
        pytest.skip("the run finished before the kill landed (a very fast machine)")
    assert proc.returncode != 0 and record["status"] == "killed", out[-2000:]
    assert "SIGKILL" in record["error"] and "out-of-memory killer" in record["error"]
    assert record["attempts"][-1]["exit_code"] == -signal.SIGKILL
    newest = max(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert newest >= 60

    out = run_make(repo, "continue").stdout
    assert "continuing" in out and "(killed)" in out and "resuming from its checkpoint" in out
    record = json.loads((run_dir.parent / "plan.json").read_text())["runs"][0]
    assert record["status"] == "done" and [a["resumed_from"] for a in record["attempts"]] == [None, newest]
    assert f"resumed from step {newest}" in (run_dir / "train.log").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, run_dir))
    assert (a["final_val_loss"], a["final_train_loss"]) == (b["final_val_loss"], b["final_train_loss"])
    assert logged_losses(whole) == logged_losses(run_dir), "every logged loss, before and after the kill"
    assert not list(run_dir.glob("attempt-*")), "a resumed run sets nothing aside"


@pytest.fixture
def stopped_run(tmp_path, monkeypatch):
    """A one-run plan whose run trained 20 steps with checkpoints; Popen recorded instead of started."""
    plan = Plan.create(tmp_path / "runs", "p", "single", [{"name": "base", "baseline": None, "differences": []}])
    run_dir = plan.run_dir("base")
    trainer(tmp_path, run_dir, "MAX_ITERS=20 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10").run()
    started = []
    monkeypatch.setattr(runner, "subprocess", SimpleNamespace(Popen=lambda args, **kw: started.append(args)))
    return plan, run_dir, started


@pytest.mark.parametrize("status", ["failed", "killed", "interrupted", "time_limit", "running", "pending"])
def test_continuing_a_run_with_a_checkpoint_resumes_whatever_its_status(stopped_run, status):
    plan, run_dir, started = stopped_run
    plan.update("base", status=status, error="boom")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    runner.start_run(plan, "base", None)
    assert started[-1][-1] == "--resume"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("attempt-*"))
    assert plan.run_by_name("base")["attempts"][-1]["resumed_from"] == 20


def test_a_run_without_a_checkpoint_starts_over_and_keeps_each_attempt_aside(stopped_run):
    plan, run_dir, started = stopped_run
    for p in (run_dir / "checkpoints").iterdir():
        p.unlink() if p.name == "best.pt" else p.write_bytes(p.read_bytes()[:500])  # truncated: not usable
    log = (run_dir / "train.log").read_bytes() if (run_dir / "train.log").exists() else None
    plan.update("base", status="failed", error="boom")
    runner.start_run(plan, "base", None)
    assert started[-1][-1] != "--resume"
    assert sorted(p.name for p in run_dir.iterdir()) == [".config", "attempt-1", "config.py", "provenance.json"]
    assert (run_dir / "attempt-1" / "metrics.jsonl").exists() and len(list((run_dir / "attempt-1" / "checkpoints").iterdir())) == 2
    (run_dir / "train.log").write_text("second attempt\n")
    runner.start_run(plan, "base", None)
    assert sorted(p.name for p in run_dir.iterdir()) == [".config", "attempt-1", "attempt-2", "config.py",
                                                         "provenance.json"]
    assert [a["resumed"] for a in json.loads((run_dir / "provenance.json").read_text())["attempts"]] == [False, False]
    assert (run_dir / "attempt-2" / "train.log").read_text() == "second attempt\n"
    assert log is None or (run_dir / "attempt-1" / "train.log").read_bytes() == log


@pytest.mark.parametrize("code, summary, status, words", [
    (0, {"status": "done"}, "done", None),
    (0, {"status": "time_limit", "error": "stopped by the time limit"}, "time_limit", "time limit"),
    (130, {"status": "interrupted", "error": "interrupted by SIGTERM"}, "interrupted", "SIGTERM"),
    (-9, {}, "killed", "out-of-memory killer"),
    (137, {}, "killed", "SIGKILL"),
    (-11, {}, "killed", "SIGSEGV"),
    (1, {"status": "failed", "error": "ValueError: bad"}, "failed", "ValueError: bad"),
    (1, {}, "failed", "exited with code 1"),
])
def test_plan_json_says_why_a_run_stopped(tmp_path, code, summary, status, words):
    got, error = runner.outcome(code, summary, tmp_path)
    assert got == status and (words is None or words in error)


def fill_disk(mount: Path, leave: int) -> None:
    """Fill the filesystem at ``mount`` up to ``leave`` free bytes."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (the monkeypatched test below covers the logic)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_plan_says_why(repo, small_disk):
    """A real full filesystem: the step-40 checkpoint cannot be written; make continue then resumes from
    step 20 once there is space again, finding the plan through the SET override of RUNS_DIR."""
    settings = f"{TINY} CHECKPOINT_INTERVAL=20 EVAL_INTERVAL=1000 LOG_INTERVAL=10"
    run_make(repo, "defconfig-quickstart")
    run_make(repo, env={"SET": f"{settings} MAX_ITERS=20"})  # how large is one checkpoint?
    settings += " MAX_ITERS=60"
    size = next((repo / "runs").glob("*/base/checkpoints/step-00000020.pt")).stat().st_size
    proc = subprocess.Popen(["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}"], cwd=repo,
                            env=dict(os.environ, SET=f'{settings} RUNS_DIR="{small_disk}"'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(small_disk.glob("*/base/train.log")) and time.time() < deadline:
        time.sleep(0.01)
    fill_disk(small_disk, leave=int(1.5 * size))  # room for one more checkpoint, not two
    out = proc.communicate(timeout=120)[0]
    run_dir = next(small_disk.glob("*/base"))
    record = json.loads((run_dir.parent / "plan.json").read_text())["runs"][0]
    assert proc.returncode != 0 and record["status"] == "failed", out[-3000:]
    assert "cannot write the checkpoint" in record["error"] and "no space left on the device" in record["error"]
    assert "MiB free there" in record["error"] and "step-00000040.pt" in record["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000020.pt"], "no partial file"
    assert checkpoint.load(run_dir / "checkpoints" / "step-00000020.pt")["step"] == 20
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"

    (small_disk / "filler").unlink()
    out = run_make(repo, "continue", env={"SET": f'RUNS_DIR="{small_disk}"'}).stdout
    assert "(failed)" in out and "resuming from its checkpoint" in out
    record = json.loads((run_dir.parent / "plan.json").read_text())["runs"][0]
    assert record["status"] == "done" and record["attempts"][-1]["resumed_from"] == 20


def test_a_failing_checkpoint_writer_ends_the_run_with_a_named_error(tmp_path, monkeypatch):
    """The same fault without a small filesystem: torch's zip writer raising RuntimeError mid-file."""
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, "MAX_ITERS=30 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=1000")
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\3\4 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*step-00000020.pt: RuntimeError: "
                                              r".*unexpected pos.* free there\); the partial file was removed"):
        t.run()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000010.pt"]
    assert checkpoint.latest(run_dir)[1]["step"] == 10


def test_resume_drops_a_torn_last_metrics_line_and_names_damage_elsewhere(tmp_path):
    run_dir = tmp_path / "run"
    trainer(tmp_path, run_dir, "MAX_ITERS=20 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10").run()
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 25, "train_lo')  # a short write at a full disk or a kill
    t, said = trainer(tmp_path, run_dir, "MAX_ITERS=30 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10"), []
    t.log = said.append
    t.resume()
    assert t.start_step == 20 and any("dropped a torn last line" in m for m in said)
    assert metrics.read_text() == good, "every complete record up to the checkpoint, nothing else"
    assert t.run()["status"] == "done" and max(logged_losses(run_dir)) == 30

    lines = metrics.read_text().splitlines()
    lines[3] = lines[3][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match=rf"{metrics}:4: not a metrics record .*Remove or repair that line"):
        keep_until(metrics, 30)


def oom_at(t, step: int, where: str = "forward"):
    """Make training step ``step`` (0-based) raise CUDA's out-of-memory error in the forward or the update."""
    state = {"step": 0}
    train_step = t.train_step

    def counted(s):
        state["step"] = s
        return train_step(s)

    t.train_step = counted
    if where == "forward":
        forward = t.forward

        def failing(x, y):
            if t.model.training and state["step"] == step:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(x, y)

        t.forward = failing
    else:
        update = t.optimizer.step

        def failing_update(*args, **kwargs):
            if state["step"] == step:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return update(*args, **kwargs)

        t.optimizer.step = failing_update


def test_out_of_memory_checkpoints_the_last_good_step_and_says_how_to_fit(tmp_path):
    extra = "MAX_ITERS=20 EVAL_INTERVAL=1000 LOG_INTERVAL=1 CHECKPOINT_INTERVAL=5"
    whole = trainer(tmp_path, tmp_path / "whole", extra)
    whole.run()
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, extra)
    oom_at(t, 7)
    summary = t.run()
    assert summary["status"] == "failed" and summary["out_of_memory"] and summary["steps"] == 7
    for words in ("out of memory in step 8", "the state after step 7 is checkpointed", "CONFIG_MICRO_BATCH=8",
                  "CONFIG_GRAD_ACCUM=1", "CONFIG_ACT_CKPT=y", "'make check' predicts", "GiB per device"):
        assert words in summary["error"]
    assert checkpoint.latest(run_dir)[1]["step"] == 7
    resumed = trainer(tmp_path, run_dir, extra)
    resumed.resume()
    assert resumed.run()["status"] == "done"
    assert logged_losses(run_dir) == logged_losses(tmp_path / "whole"), "the checkpoint is the state before the step"


def test_out_of_memory_during_the_update_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, "MAX_ITERS=20 EVAL_INTERVAL=1000 CHECKPOINT_INTERVAL=5")
    oom_at(t, 7, where="update")
    summary = t.run()
    assert summary["status"] == "failed" and "while the optimizer was updating the weights" in summary["error"]
    assert checkpoint.latest(run_dir)[1]["step"] == 5


def test_time_based_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    t = trainer(tmp_path, run_dir, "MAX_ITERS=10 EVAL_INTERVAL=1000 CHECKPOINT_INTERVAL=0 CHECKPOINT_MINUTES=1 "
                                   "CHECKPOINT_KEEP=100")
    now = [0.0]
    t.clock = lambda: now[0]
    train_step = t.train_step

    def step_of_20_seconds(step):
        now[0] += 20
        return train_step(step)

    t.train_step = step_of_20_seconds
    assert t.run()["status"] == "done"
    assert [p.name for p in checkpoint.step_paths(run_dir)] == [f"step-{s:08d}.pt" for s in (3, 6, 9, 10)]


@pytest.mark.slow
def test_a_run_cut_by_max_time_says_so_and_continue_trains_the_rest(repo):
    elsewhere = repo.parent / "elsewhere"
    settings = f'{TINY.replace("MAX_TIME=0", "MAX_TIME=2")} MAX_ITERS=100000 EVAL_INTERVAL=100000 LOG_INTERVAL=50 RUNS_DIR="{elsewhere}"'
    run_make(repo, "defconfig-quickstart")
    p = run_make(repo, env={"SET": settings}, check=False)
    run_dir = next(elsewhere.glob("*/base"))
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir.parent / "plan.json").read_text())["runs"][0]
    assert p.returncode != 0 and record["status"] == "time_limit" and summary["status"] == "time_limit"
    steps = summary["steps"]
    assert 0 < steps < summary["planned_steps"] == 100000 and summary["final_lr"] > 0
    assert f"stopped by the time limit CONFIG_MAX_TIME=2s at step {steps} of 100000" in p.stdout
    assert f"at step {steps} of 100000" in record["error"] and checkpoint.latest(run_dir)[1]["step"] == steps
    assert "nothing to continue" in run_make(repo, "continue").stdout, "the default RUNS_DIR has no plan"
    out = run_make(repo, "continue", env={"SET": f'RUNS_DIR="{elsewhere}"'}, check=False).stdout
    assert "(time_limit)" in out and "resuming from its checkpoint" in out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] > steps, "another MAX_TIME of training"


@pytest.mark.slow
def test_a_named_error_in_training_shows_its_message_and_keeps_the_traceback_in_the_log(tmp_path):
    from test_checkpoint import train_process

    run_dir = tmp_path / "run"
    configure(tmp_path, run_dir, "MAX_ITERS=5 EVAL_INTERVAL=5")
    assert train_process(run_dir).wait() == 0
    configure(tmp_path, run_dir, "MAX_ITERS=5 EVAL_INTERVAL=5 N_LAYER=3")
    proc = train_process(run_dir, "--resume")
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1
    assert "error: " in stderr and "differing symbols: CONFIG_N_LAYER" in stderr and "Traceback" not in stderr
    assert "Traceback" in (run_dir / "train.log").read_text()
    error = json.loads((run_dir / "summary.json").read_text())["error"]
    assert error.startswith(f"{checkpoint.latest(run_dir)[0]} was trained with a different model"), error


def test_a_run_configured_by_an_older_kbuild_continues_with_the_new_symbols_defaults(stopped_run, capsys):
    from kconfig.tree import END_MARKER, load

    plan, run_dir, _ = stopped_run
    dot = run_dir / ".config"
    new = dot.read_text()
    old = [line for line in new.splitlines() if "CHECKPOINT_MINUTES" not in line and line != END_MARKER
           and not line.startswith("# A complete file ends")]  # as the tree wrote it before both existed
    dot.write_text("\n".join(old) + "\n")
    runner.prepare_to_continue(plan, ["base"])
    assert "run base: its .config predates CONFIG_CHECKPOINT_MINUTES=" in capsys.readouterr().out
    assert dot.read_text().rstrip().endswith(END_MARKER) and load(dot)[1].CHECKPOINT_MINUTES is not None

    dot.write_text(new[:len(new) // 2])  # cut short by hand: refused, nothing rewritten
    with pytest.raises(Exception, match=r"run base: .*\.config is truncated"):
        runner.prepare_to_continue(plan, ["base"])
    assert dot.read_text() == new[:len(new) // 2]


def test_a_crafted_checkpoint_is_named_as_refused_not_just_unreadable(tmp_path):
    import pickle

    run_dir = tmp_path / "run"
    trainer(tmp_path, run_dir, "MAX_ITERS=10 CHECKPOINT_INTERVAL=10 EVAL_INTERVAL=10").run()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'owned'}",))

    path = run_dir / "checkpoints" / "step-00000010.pt"
    torch.save({"step": Exploit()}, path, pickle_module=pickle)
    said = []
    assert checkpoint.latest(run_dir, warn=said.append) is None and not (tmp_path / "owned").exists()
    assert "(refusing to load: it pickles posix.system, which is not checkpoint data" in said[0]
    assert "trying an earlier one" in said[0]
    with pytest.raises(CheckpointError, match=r"no readable checkpoint \(step-00000010.pt: refusing to load: it "
                                              r"pickles posix.system"):
        checkpoint.newest(run_dir)


def test_out_of_memory_frees_the_failed_steps_tensors_before_the_checkpoint(tmp_path):
    """The failed forward's activations are gone (no garbage collection needed) by the time the checkpoint of
    the last good step is written: on a GPU, empty_cache() can then hand that memory back."""
    import gc
    import weakref

    t = trainer(tmp_path, tmp_path / "run", "MAX_ITERS=20 EVAL_INTERVAL=1000 CHECKPOINT_INTERVAL=5")
    state, seen = {"step": 0}, {}
    train_step, forward, save = t.train_step, t.forward, t.save_checkpoint

    def counted(s):
        state["step"] = s
        return train_step(s)

    def failing(x, y):
        if t.model.training and state["step"] == 7:
            activation = torch.ones(1000, 1000)  # stands for what the forward had allocated
            seen["activation"] = weakref.ref(activation)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x, y)

    def saving(*args, **kwargs):
        if "activation" in seen:
            seen["alive_at_save"] = seen["activation"]() is not None
        return save(*args, **kwargs)

    t.train_step, t.forward, t.save_checkpoint = counted, failing, saving
    gc.disable()
    try:
        summary = t.run()
    finally:
        gc.enable()
    assert summary["out_of_memory"] and summary["steps"] == 7
    assert seen["alive_at_save"] is False
