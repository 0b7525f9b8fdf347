"""Experiment trackers, progress bars and system metrics (train/trackers.py, train/progress.py,
train/system_metrics.py, data/progress.py). No network: W&B runs offline."""

from __future__ import annotations

import io
import json
import math
import re
import sqlite3
import struct
import sys

import pytest
import torch

from conftest import config_of
from data.progress import Progress
from train import trackers as trackers_mod
from train.progress import TrainProgress
from train.system_metrics import sample_system
from train.trackers import Trackers, flatten, tracker_problems

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef"  # the 40-character shape of a real W&B key
RECORDS = [
    {"step": 10, "train_loss": 2.5, "lr": 1e-3, "mfu": None, "moe_load": [[0.5, 0.5]], "data_share": {"web": 1.0}},
    {"step": 20, "train_loss": 2.0, "lr": 1e-3, "grad_norm": float("nan")},
    {"step": 20, "val_loss": 2.25, "val_losses": {"val": 2.25, "code": 3.0}},
]


def log_all(t: Trackers) -> None:
    for record in RECORDS:
        t.log(record, record["step"])


def test_flatten_keeps_finite_scalars_and_names_nested_ones():
    flat = flatten({"step": 5, "loss": 1.5, "mfu": None, "nan": float("nan"), "ok": True, "name": "x",
                    "moe_load": [[0.1, 0.9]], "val_losses": {"val": 2.0, "code": 3}})
    assert flat == {"loss": 1.5, "ok": 1.0, "val_losses/val": 2.0, "val_losses/code": 3.0}


# --------------------------------------------------------------------------- W&B, TensorBoard, trackio


def read_wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log chunks (crc, length, type) in 32 KiB
    blocks, each record a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for name, value in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_X_DISABLE_STATS": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_wandb_offline_and_tensorboard_write_metrics_and_config_but_never_the_key(quiet_wandb, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "runs" / "myplan" / "run-a"
    run_dir.mkdir(parents=True)
    messages = []
    t = Trackers.from_config(config_of(PLAN_NAME="myplan", SEED=1337, TRACK_WANDB=True, TRACK_TENSORBOARD=True),
                             run_dir, "myplan", "run-a", log=messages.append)
    assert t.names == ["wandb", "tensorboard"], messages
    log_all(t)
    t.finish({"status": "done", "steps": 20, "final_val_loss": 2.25, "sample": "text"})
    import wandb

    wandb.teardown()  # wandb-core writes the file asynchronously; this waits for it (exit does too)

    # W&B: offline run inside the run directory, with the run's names, config, metrics and summary
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.run_group) == ("myplan", "run-a", "myplan")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["PLAN_NAME"] == "myplan" and config["SEED"] == 1337
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h.get("train_loss"), h.get("val_losses/code")) for h in history] == \
        [(10, 2.5, None), (20, 2.0, 3.0)]
    assert history[0]["data_share/web"] == 1.0 and "moe_load" not in history[0] and "grad_norm" not in history[1]
    summary = {i.key or "/".join(i.nested_key): i.value_json for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert json.loads(summary["final_val_loss"]) == 2.25
    assert json.loads((run_dir / "trackers.json").read_text()) == {"wandb_id": run.run_id}

    # TensorBoard: the same scalars, read back from the event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(10, 2.5), (20, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("val_losses/code")] == [(20, 3.0)]

    # the key is in the environment only: no file of the run (binary ones included), no message
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()
              and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == [] and not any(FAKE_KEY in m for m in messages)
    assert len([p for p in run_dir.rglob("*") if p.is_file()]) > 3  # the grep did look at something


def test_trackio_logs_to_its_project_database(monkeypatch, tmp_path):
    if "trackio" not in sys.modules and not trackers_mod._installed("trackio"):
        pytest.skip("trackio is not installed (pip install trackio); it is in the 'track' extra only")
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before this test could point TRACKIO_DIR at a temporary folder")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # trackio reads it when first imported
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t = Trackers.from_config(config_of(PLAN_NAME="myplan", TRACK_TRACKIO=True), run_dir, "myplan", "run-a",
                             log=lambda m: None)
    assert t.names == ["trackio"]
    log_all(t)
    t.finish({"status": "done"})
    (db,) = (tmp_path / "trackio").glob("myplan*.db")  # one database per project (the plan)
    rows = sqlite3.connect(db).execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    logged = {}
    for step, metrics in rows:
        logged.setdefault(step, {}).update(json.loads(metrics))
    assert logged[10]["train_loss"] == 2.5 and logged[20]["val_losses/code"] == 3.0


# --------------------------------------------------------------------------- failures never stop a run


def test_missing_packages_are_reported_with_pip_command_and_skipped(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = config_of(TRACK_WANDB=True, TRACK_TENSORBOARD=True)
    problems = tracker_problems(cfg)
    assert len(problems) == 2
    assert "CONFIG_TRACK_WANDB=y" in problems[0] and "-m pip install wandb" in problems[0]
    assert "CONFIG_TRACK_TENSORBOARD=y" in problems[1] and "-m pip install tensorboard" in problems[1]
    messages = []
    t = Trackers.from_config(cfg, tmp_path, "myplan", "run-a", log=messages.append)
    assert t.names == [] and len(messages) == 2 and "pip install wandb" in messages[0]
    log_all(t)
    t.finish({"status": "done"})
    assert not (tmp_path / "trackers.json").exists()
    assert tracker_problems(config_of()) == []


def test_online_wandb_without_a_key_is_a_problem(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from 'wandb login'
    monkeypatch.setattr(trackers_mod, "_installed", lambda module: True)
    cfg = config_of(TRACK_WANDB=True, WANDB_MODE_ONLINE=True)
    assert any("WANDB_API_KEY" in p for p in tracker_problems(cfg))
    assert not any("WANDB_API_KEY" in p for p in tracker_problems(config_of(TRACK_WANDB=True))), "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracker_problems(cfg) == []


def test_a_tracker_that_fails_to_start_is_skipped(monkeypatch, tmp_path):
    class Down:
        def __init__(self, *args):
            raise ConnectionError(f"cannot reach api.wandb.ai with {FAKE_KEY}")

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setattr(trackers_mod, "_installed", lambda module: True)
    monkeypatch.setattr(trackers_mod, "WandbTracker", Down)
    messages = []
    t = Trackers.from_config(config_of(TRACK_WANDB=True), tmp_path, "myplan", "run-a", log=messages.append)
    assert t.names == [] and "could not start (ConnectionError" in messages[0]
    assert FAKE_KEY not in messages[0] and "***" in messages[0]  # scrubbed


class Recorder:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.logged, self.finished = name, fail, [], None

    def log(self, metrics, step):
        if self.fail:
            raise ConnectionError("network is unreachable")
        self.logged.append((step, metrics))

    def finish(self, summary):
        self.finished = summary


def test_log_failures_are_reported_rate_limited_then_the_tracker_is_switched_off():
    flaky, good, messages = Recorder("flaky", fail=True), Recorder("good"), []
    t = Trackers([flaky, good], log=messages.append)
    for step in range(1, trackers_mod.MAX_FAILURES + 5):
        t.log({"train_loss": 1.0 / step}, step)  # never raises
    assert len(messages) == 2
    assert "flaky: log failed (ConnectionError: network is unreachable); training continues" in messages[0]
    assert f"{trackers_mod.MAX_FAILURES} failures in a row" in messages[1] and "switched off" in messages[1]
    assert t.names == ["good"] and len(good.logged) == trackers_mod.MAX_FAILURES + 4
    assert good.logged[0] == (1, {"train_loss": 1.0})
    t.finish({"status": "done"})
    assert good.finished == {"status": "done"} and flaky.finished is None


# --------------------------------------------------------------------------- system metrics and progress


def test_sample_system_on_cpu_reports_resident_memory():
    sample = sample_system(torch.device("cpu"))
    assert 0.001 < sample["cpu_rss_gib"] < 1024
    assert not any(key.startswith("gpu_") for key in sample)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_train_progress_draws_a_bar_only_on_a_terminal():
    plain = io.StringIO()
    p = TrainProgress(total=100, stream=plain)
    p.update(10, loss=2.5)
    p.close()
    assert not p.enabled and plain.getvalue() == ""

    tty, lines = FakeTTY(), []
    p = TrainProgress(total=100, stream=tty)
    log = p.wrap_log(lines.append)
    log("before the first step")  # no bar yet: nothing to clear
    assert p.enabled and tty.getvalue() == ""
    p.update(20)  # a resumed run: the bar starts at its first step
    p.update(50, loss=2.123456, lr=1e-3)
    log("step 50 | loss 2.1235")
    p.close()
    out = tty.getvalue()
    assert p.enabled is False and lines == ["before the first step", "step 50 | loss 2.1235"]  # closed
    assert "train:" in out and "50/100" in out and "loss=2.123" in out
    assert re.findall(r"(\d+)/100", out)[0] == "20", "the bar starts at step 20, not 0"

    off = FakeTTY()
    p = TrainProgress.from_config(config_of(PROGRESS_BAR=False), total=100, stream=off)
    p.update(10)
    assert not p.enabled and off.getvalue() == ""
    assert TrainProgress.from_config(config_of(), total=100, stream=FakeTTY()).enabled


def test_data_progress_bar_on_a_terminal_plain_lines_otherwise():
    lines = []
    p = Progress(4_000_000, "tokenizing", lines.append, interval=0.0, stream=io.StringIO())
    p.update(2_000_000)
    p.close()
    assert p.bar is None and lines[0].startswith("data: tokenizing: 2 MB of 4 MB (50%)")

    tty, lines = FakeTTY(), []
    p = Progress(4_000_000, "tokenizing", lines.append, interval=0.0, stream=tty)
    p.update(2_000_000)
    assert p.bar.n == 2_000_000
    p.close()
    assert lines == [] and "tokenizing:" in tty.getvalue() and "/4.00M [" in tty.getvalue()
    assert Progress(10, "x", lines.append, stream=FakeTTY(), enabled=False).bar is None


def test_finite_summary_values_only():
    assert flatten({"best_val_loss": math.inf, "steps": 3}) == {"steps": 3.0}
