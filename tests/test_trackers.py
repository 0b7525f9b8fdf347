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
from train.trackers import FINAL_KEYS, TRACKER_KEYS, Trackers, final_metrics, flatten, tracker_metrics, tracker_problems

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef"  # the 40-character shape of a real W&B key
RECORDS = [
    {"step": 10, "tokens": 640, "train_loss": 2.5, "lr": 1e-3, "mfu": None, "moe_load": [[0.5, 0.5]],
     "data_share": {"web": 1.0}, "tokens_per_s": 100.0},
    {"step": 20, "tokens": 1280, "train_loss": 2.0, "lr": 1e-3, "grad_norm": float("nan")},
    {"step": 20, "tokens": 1280, "val_loss": 2.25, "val_losses": {"val": 2.25, "code": 3.0}, "val_bpb": 1.5,
     "val_bpbs": {"val": 1.5, "code": None}, "eval": {"hellaswag": {"acc,none": 0.25}}},
]
SUMMARY = {"status": "done", "steps": 20, "tokens": 1280, "final_val_loss": 2.25, "best_val_loss": 2.25,
           "final_val_losses": {"val": 2.25, "code": 3.0}, "mfu": None, "sample": "text", "data": {"sources": 1}}


def log_all(t: Trackers) -> None:
    for record in RECORDS:
        t.log(record, record["step"])


def test_flatten_keeps_finite_scalars_and_names_nested_ones():
    flat = flatten({"step": 5, "loss": 1.5, "mfu": None, "nan": float("nan"), "ok": True, "name": "x",
                    "moe_load": [[0.1, 0.9]], "val_losses": {"val": 2.0, "code": 3}})
    assert flat == {"loss": 1.5, "ok": 1.0, "val_losses/val": 2.0, "val_losses/code": 3.0}


def test_every_tracker_gets_namespaced_keys_from_the_one_table():
    assert tracker_metrics(RECORDS[0]) == {"tokens": 640.0, "train/loss": 2.5, "train/lr": 1e-3,
                                           "data/share/web": 1.0, "perf/tokens_per_s": 100.0}
    assert tracker_metrics(RECORDS[2]) == {"tokens": 1280.0, "val/loss": 2.25, "val/val/loss": 2.25,
                                           "val/code/loss": 3.0, "val/bpb": 1.5, "val/val/bpb": 1.5,
                                           "eval/hellaswag/acc,none": 0.25}
    named = {"grad_norm": "train/grad_norm", "train_eval_loss": "train/eval_loss", "mfu": "perf/mfu",
             "dpo_accuracy": "train/dpo_accuracy", "val_dpo_accuracy": "val/dpo_accuracy",
             "gpu_mem_peak_gib": "system/gpu_mem_peak_gib", "moe_load_max": "moe/load_max",
             "seq_len": "curriculum/seq_len", "elapsed_s": "perf/elapsed_s", "new_metric": "new_metric"}
    assert tracker_metrics({key: 1.0 for key in named}) == {value: 1.0 for value in named.values()}
    assert final_metrics(SUMMARY) == {"final/steps": 20.0, "final/tokens": 1280.0, "final/val/loss": 2.25,
                                      "final/val/best_loss": 2.25, "final/val/val/loss": 2.25,
                                      "final/val/code/loss": 3.0}
    for pattern, template in TRACKER_KEYS + FINAL_KEYS:  # a row's name is namespaced; '*' fills its '{}'
        assert template == "tokens" or "/" in template, pattern
        assert pattern.endswith("*") == ("{}" in template), pattern


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
    t.finish(SUMMARY)
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
    assert [(h["_step"], h["tokens"], h.get("train/loss"), h.get("val/code/loss")) for h in history] == \
        [(10, 640, 2.5, None), (20, 1280, 2.0, 3.0)]
    assert history[0]["data/share/web"] == 1.0 and history[1]["eval/hellaswag/acc,none"] == 0.25
    assert not any("moe_load" in key or "grad_norm" in key for h in history for key in h)
    # tokens is the x axis of every namespace's charts
    axes = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records
            if r.WhichOneof("record_type") == "metric"}
    assert axes["tokens"] == "" and {axes[f"{n}/*"] for n in ("train", "val", "perf", "eval")} == {"tokens"}
    summary = {i.key or "/".join(i.nested_key): i.value_json for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert json.loads(summary["final/val/loss"]) == 2.25 and json.loads(summary["final/val/code/loss"]) == 3.0
    assert json.loads((run_dir / "trackers.json").read_text()) == {"wandb_id": run.run_id}

    # TensorBoard: the same scalars, read back from the event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.5), (20, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/code/loss")] == [(20, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("final/val/loss")] == [(20, 2.25)]
    hparams = read_hparams(events)
    assert hparams["PLAN_NAME"] == "myplan" and hparams["SEED"] == 1337
    assert hparams["LR"] == pytest.approx(6e-4) and hparams["TRACK_WANDB"] == 1.0  # a bool as 0/1
    assert "ROPE_THETA" not in hparams  # unset (its menu is off): left out

    # the key is in the environment only: no file of the run (binary ones included), no message
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()
              and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == [] and not any(FAKE_KEY in m for m in messages)
    assert len([p for p in run_dir.rglob("*") if p.is_file()]) > 3  # the grep did look at something


def read_hparams(events) -> dict:
    """The hyperparameters a run's event files hold for TensorBoard's HPARAMS tab."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" not in content  # TensorBoard derives it from all runs (TensorBoardTracker)
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: MessageToDict(v) for k, v in start.hparams.items()}  # a protobuf Value: its number, text or bool


def hparams_table(logdir) -> tuple[list[str], dict[str, dict]]:
    """What TensorBoard's HPARAMS tab shows for ``logdir``, read through TensorBoard's own hparams backend:
    the hyperparameter columns, and per run (session) its status, hyperparameters and metrics."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    backend = backend_context.Context(base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=MultiplexerDataProvider(multiplexer, str(logdir))))
    request = context.RequestContext()
    experiment = backend.experiment_from_metadata(request, "", True, backend.hparams_metadata(request, ""),
                                                  backend.hparams_from_data_provider(request, "", 0))
    groups = list_session_groups.Handler(request, backend, "", api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, include_metrics=True,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS])).run().session_groups
    runs = {g.name: {"status": api_pb2.Status.Name(g.sessions[0].status),
                     "hparams": {k: MessageToDict(v) for k, v in g.hparams.items()},
                     "metrics": {m.name.tag: m.value for m in g.metric_values}} for g in groups}
    return [h.name for h in experiment.hparam_infos], runs


def test_tensorboard_hparams_tab_compares_the_runs_of_a_plan(tmp_path):
    pytest.importorskip("tensorboard")
    for name, settings, status in (("a", "SEED=1", "done"), ("b", "SEED=2 MTP_HEADS=1", "interrupted")):
        (tmp_path / name).mkdir()
        t = Trackers.from_config(config_of(settings, "TRACK_TENSORBOARD=y"), tmp_path / name, "plan", name,
                                 log=lambda m: None)
        t.log({"step": 10, "tokens": 640, "train_loss": 2.0 if name == "a" else 1.75}, 10)
        t.finish({"status": status, "steps": 10, "final_val_loss": 1.5})
    columns, runs = hparams_table(tmp_path)
    assert {"SEED", "LR", "MTP_HEADS", "MTP_WEIGHT"} <= set(columns)  # MTP_WEIGHT: set in run b only
    assert runs["a/tensorboard"]["status"] == "STATUS_SUCCESS"
    assert runs["b/tensorboard"]["status"] == "STATUS_UNKNOWN"  # stopped: 'make continue' can complete it
    assert (runs["a/tensorboard"]["hparams"]["SEED"], runs["b/tensorboard"]["hparams"]["SEED"]) == (1, 2)
    assert "MTP_WEIGHT" not in runs["a/tensorboard"]["hparams"]
    assert runs["a/tensorboard"]["metrics"] == {"tokens": 640, "train/loss": 2.0, "final/steps": 10,
                                                "final/val/loss": 1.5}
    assert runs["b/tensorboard"]["metrics"]["train/loss"] == 1.75


@pytest.mark.slow
def test_a_training_run_logs_every_metric_under_a_table_name_with_the_config_as_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from data.prepare import prepare
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train.trainer import Trainer

    lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox") for b in ("one", "two")]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 100) + "\n")
    cfg = config_of("DATA_PATH=corpus.txt DATA_CACHE_DIR=cache MODEL_SIZE_CUSTOM=y N_LAYER=1 N_HEAD=2 N_EMBD=32 "
                    "BLOCK_SIZE=16 MICRO_BATCH=4 MAX_ITERS=4 WARMUP_ITERS=1 EVAL_INTERVAL=2 EVAL_BATCHES=1 "
                    "LOG_INTERVAL=2 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=4 SEED=3 TRACK_TENSORBOARD=y")
    run_dir = tmp_path / "runs" / "myplan" / "run-a"
    run_dir.mkdir(parents=True)
    summary = Trainer(cfg, prepare(cfg, tmp_path, log=lambda m: None), run_dir, log=lambda m: None).run()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    written = {key for record in records for key in flatten(record)}
    assert {"train_loss", "val_losses/val", "tokens_per_s"} <= written  # metrics.jsonl keeps its own names
    assert [key for key in written if trackers_mod.tracker_key(key) is None] == []  # the table names each
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == set().union(*(tracker_metrics(r) for r in records)) | set(final_metrics(summary))
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "val/loss", "val/val/loss",
            "tokens", "final/val/loss"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert events.Scalars("final/val/loss")[0].value == pytest.approx(summary["final_val_loss"])
    hparams = read_hparams(events)
    assert hparams["MAX_ITERS"] == 4 and hparams["N_EMBD"] == 32 and hparams["DATA_PATH"] == "corpus.txt"


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
    t.finish(SUMMARY)
    (db,) = (tmp_path / "trackio").glob("myplan*.db")  # one database per project (the plan)
    database = sqlite3.connect(db)
    rows = database.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    logged = {}
    for run_name, step, metrics in rows:
        assert run_name == "run-a"
        logged.setdefault(step, {}).update(json.loads(metrics))
    assert logged[10] == tracker_metrics(RECORDS[0])
    assert logged[20]["train/loss"] == 2.0 and logged[20]["val/code/loss"] == 3.0 and logged[20]["tokens"] == 1280
    ((config,),) = database.execute("SELECT config FROM configs WHERE run_name = 'run-a'").fetchall()
    assert json.loads(config)["PLAN_NAME"] == "myplan" and json.loads(config)["_Group"] == "myplan"


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
    assert good.logged[0] == (1, {"train/loss": 1.0})  # under its tracker name
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
