"""plan/report.py on synthetic plan directories: tables, numbers, plots, atomic writes."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from plan.report import COLUMNS, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What a plan with summaries and metrics gets (eval.png only once make eval has run)
PLOTS = ("figure.png", "loss.png", "final_val_loss.png", "tokens_per_s.png")
FILES = {"report.md", "report.csv", "figure.svg", *PLOTS}


def write_run(plan_dir: Path, name: str, final: float, tps: float, steps: int = 400, metrics: bool = True) -> None:
    """A done run: summary.json and a metrics.jsonl whose val loss decreases to ``final``."""
    run_dir = plan_dir / name
    run_dir.mkdir(parents=True)
    summary = {"status": "done", "steps": steps, "tokens": steps * 2048, "final_train_loss": final + 0.1,
               "final_val_loss": final, "best_val_loss": final, "best_val_step": steps,
               "unigram_entropy_nats": 3.2, "tokens_per_s": tps, "flops_per_s": tps * 6e6, "mfu": None,
               "params": 869504, "params_non_embedding": 800000, "wall_time_s": steps * 2048 / tps,
               "device": "cpu (2 threads)", "dtype": "fp32", "sample": "def f():", "data": {}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if metrics:
        lines = []
        for step in range(100, steps + 1, 100):
            t = step * 2048 / tps
            lines.append({"step": step, "tokens": step * 2048, "train_loss": final + 1, "lr": 1e-3,
                          "grad_norm": 1.0, "tokens_per_s": tps, "flops_per_s": 1.0, "mfu": None, "elapsed_s": t})
            lines.append({"step": step, "tokens": step * 2048, "val_loss": final + 1.0 * (steps - step) / steps,
                          "train_eval_loss": final, "elapsed_s": t + 0.5})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_plan(plan_dir: Path, mode: str, runs: list[dict]) -> None:
    plan_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"status": "done", "error": None, "start": None, "end": None, "baseline": False, **r} for r in runs]
    (plan_dir / "plan.json").write_text(json.dumps({"name": plan_dir.name, "mode": mode,
                                                    "created": "2026-01-01T00:00:00", "runs": runs}))


@pytest.fixture
def ablation(tmp_path) -> Path:
    """Baseline, a better LR run, a RoPE run, one failed (partial metrics) and one rejected run."""
    d = tmp_path / "abl"
    write_plan(d, "ablation", [
        {"name": "base", "baseline": True, "differences": {}},
        {"name": "lr3e-4", "differences": {"LR": 0.0003}},
        {"name": "pos_rope-no-qk_norm", "differences": {"POS_ROPE": True, "QK_NORM": False}},
        {"name": "n_layer64", "status": "failed", "error": "CUDA out of memory | tried to allocate 2 GiB",
         "differences": {"N_LAYER": 64}},
        {"name": "n_embd30", "status": "rejected", "differences": {"N_EMBD": 30},
         "error": "CONFIG_N_EMBD=30 is not divisible by CONFIG_N_HEAD=4"},
    ])
    write_run(d, "base", 1.30, 12000.0)
    write_run(d, "lr3e-4", 1.20, 11000.0)
    write_run(d, "pos_rope-no-qk_norm", 1.25, 10000.0)
    (d / "n_layer64").mkdir()
    (d / "n_layer64" / "summary.json").write_text(json.dumps({"status": "failed", "error": "CUDA out of memory"}))
    (d / "n_layer64" / "metrics.jsonl").write_text(
        json.dumps({"step": 100, "tokens": 1, "val_loss": 2.5, "train_eval_loss": 2.6, "elapsed_s": 9.0})
        + '\n{"step": 200, "val_lo')  # torn last line: the run was killed mid-write
    return d


def read_csv(plan_dir: Path) -> list[dict]:
    with open(plan_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_ablation_report_files(ablation):
    paths = write_report(ablation)
    assert {p.name for p in paths} == FILES
    for p in paths:
        assert p.parent == ablation and p.stat().st_size > 0
    for name in PLOTS:
        png_size(ablation / name)
    leftovers = [p.name for p in ablation.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_ablation_csv_rows_and_numbers(ablation):
    write_report(ablation)
    rows = read_csv(ablation)
    assert [r["run"] for r in rows] == ["base", "lr3e-4", "pos_rope-no-qk_norm", "n_layer64", "n_embd30"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "rejected"]
    assert [r["baseline"] for r in rows] == ["True", "False", "False", "False", "False"]
    assert rows[0]["differs_from_base"] == "(baseline)"
    assert rows[1]["differs_from_base"] == "LR=0.0003"
    assert rows[2]["differs_from_base"] == "POS_ROPE=y, QK_NORM=n"
    assert float(rows[1]["final_val_loss"]) == 1.20 and float(rows[0]["tokens_per_s"]) == 12000.0
    assert int(rows[0]["params"]) == 869504 and rows[0]["mfu"] == ""
    assert rows[3]["final_val_loss"] == "" and "out of memory" in rows[3]["error"]
    assert "not divisible" in rows[4]["error"]


def test_ablation_markdown(ablation):
    write_report(ablation)
    md = (ablation / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(table) == 5
    assert "ablation" in md and "3 done, 1 failed, 1 rejected" in md
    assert "LR=0.0003" in table[1] and "(baseline)" in table[0] and "–" in table[0]  # MFU null on CPU
    assert "1.2000" in table[1] and "12,000" in table[0]
    assert "out of memory \\| tried" in table[3]  # a pipe in an error must not split the table
    best = next(line for line in md.splitlines() if line.startswith("Best run"))
    assert "`lr3e-4` (1.2000)" in best and "-0.1000" in best and "-7.69%" in best and "`base` (1.3000)" in best
    for name in PLOTS:
        assert f"({name})" in md


def test_best_run_is_baseline_and_no_baseline(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}},
                               {"name": "seed1", "differences": {"SEED": 1}}])
    write_run(d, "base", 1.1, 1000.0)
    write_run(d, "seed1", 1.3, 1000.0)
    write_report(d)
    assert "`base` (1.1000), the baseline." in (d / "report.md").read_text()
    write_plan(d, "single", [{"name": "seed1", "differences": {"SEED": 1}}])
    write_report(d)
    md = (d / "report.md").read_text()
    assert "Best run by final val loss: `seed1` (1.3000)." in md and "vs baseline" not in md


def test_matrix_30_runs(tmp_path):
    d = tmp_path / "matrix"
    runs = []
    for i in range(30):
        diff = {"N_LAYER": 2 + i % 3, "N_EMBD": 64 * (1 + i % 2), "LR": 0.001 * (1 + i % 5),
                "POS_ROPE": i % 2 == 0, "SEED": i}
        rope = "pos_rope" if diff["POS_ROPE"] else "no-pos_rope"
        name = f"n_layer{diff['N_LAYER']}-n_embd{diff['N_EMBD']}-lr{diff['LR']:g}-{rope}-seed{i}"
        runs.append({"name": name, "differences": diff})
        write_run(d, runs[-1]["name"], 1.0 + 0.01 * ((i * 7) % 30), 5000.0 + 100 * i)
    write_plan(d, "matrix", runs)
    paths = write_report(d)
    assert {p.name for p in paths} == FILES
    rows = read_csv(d)
    assert len(rows) == 30 and {r["status"] for r in rows} == {"done"}
    assert [r["run"] for r in rows] == [r["name"] for r in runs]
    md = (d / "report.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| `")]) == 30
    assert f"`{runs[0]['name']}` (1.0000)" in md  # i=0 has the lowest loss
    # Bar charts grow with the run count, so 30 names stay readable.
    small = tmp_path / "small"
    write_plan(small, "ablation", runs[:2])
    for r in runs[:2]:
        write_run(small, r["name"], 1.0, 1000.0)
    write_report(small)
    for name in ("final_val_loss.png", "tokens_per_s.png"):
        assert png_size(d / name)[1] > 2 * png_size(small / name)[1]


def test_plots_skipped_without_data(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}, "status": "pending"},
                               {"name": "lr1", "differences": {"LR": 1.0}, "status": "rejected",
                                "error": "LR out of range"}])
    paths = write_report(d)
    assert {p.name for p in paths} == {"report.md", "report.csv"}
    assert not any((d / name).exists() for name in PLOTS)
    assert "Best run" not in (d / "report.md").read_text()
    # Summaries but no metrics: the bar charts exist, the curves do not.
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}}])
    write_run(d, "base", 1.0, 1000.0, metrics=False)
    names = {p.name for p in write_report(d)}
    assert names == {"report.md", "report.csv", "final_val_loss.png", "tokens_per_s.png"}


def test_interrupted_plot_leaves_old_file(ablation, monkeypatch):
    write_report(ablation)
    before = {name: (ablation / name).read_bytes() for name in PLOTS}

    def torn_savefig(self, fname, **kw):
        Path(fname).write_bytes(PNG_SIGNATURE + b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    with pytest.raises(KeyboardInterrupt):
        write_report(ablation)
    assert {name: (ablation / name).read_bytes() for name in PLOTS} == before
    assert [p.name for p in ablation.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- provenance, time limits

def attempt(**changes) -> dict:
    """A provenance.json attempt like plan.provenance.record_attempt writes; ``changes`` override
    fields by dotted path (``git.commit``, ``versions.torch``, ``hostname``)."""
    a = {"time": "2026-01-01T00:00:00+0000",
         "git": {"commit": "a1b2c3d4e5f6" + "0" * 28, "dirty": False, "changes": None},
         "versions": {"python": "3.11.7", "torch": "2.6.0+cu124", "cuda": "12.4", "cudnn": "90100",
                      "nccl": "2.21.5", "numpy": "2.2.0"},
         "device": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "cpu": "AMD EPYC 9654", "cpu_count": 192},
         "hostname": "node1", "command": {"argv": ["/usr/bin/python", "-m", "kbuild", "run"], "SET": None},
         "set": ""}
    for path, value in changes.items():
        *parents, key = path.split(".")
        target = a
        for p in parents:
            target = target[p]
        target[key] = value
    return a


def write_provenance(plan_dir: Path, name: str, *attempts: dict) -> None:
    (plan_dir / name / "provenance.json").write_text(json.dumps({"attempts": list(attempts)}))


def provenance_section(plan_dir: Path) -> list[str]:
    lines = (plan_dir / "report.md").read_text().splitlines()
    start = lines.index("## Provenance")
    return [line for line in lines[start + 1:] if line and not line.startswith("![")]


def test_provenance_all_runs_alike(ablation):
    for name in ("base", "lr3e-4", "pos_rope-no-qk_norm", "n_layer64"):  # times, commands and SET differ
        write_provenance(ablation, name, attempt(time=f"2026-01-0{len(name) % 9 + 1}T00:00:00",
                                                 **{"command.argv": ["python", name], "command.SET": "SEED=2"}))
    write_report(ablation)
    assert provenance_section(ablation) == [
        "All 4 runs: commit a1b2c3d4e5f6 (clean), Python 3.11.7, torch 2.6.0+cu124 (CUDA 12.4, cuDNN 90100, "
        "NCCL 2.21.5), device 1× NVIDIA H100 80GB HBM3, host node1."]
    rows = read_csv(ablation)
    assert rows[0]["commit"] == "a1b2c3d4e5f6" + "0" * 28 and rows[0]["dirty"] == "False"
    assert rows[0]["hostname"] == "node1" and rows[0]["device"] == "1× NVIDIA H100 80GB HBM3"
    assert rows[4]["commit"] == "" and rows[4]["device"] == ""  # rejected: never started


def test_provenance_differences_listed(ablation):
    write_provenance(ablation, "base", attempt())
    write_provenance(ablation, "lr3e-4", attempt(**{"git.commit": "ffff" * 10, "git.dirty": True,
                                                    "git.changes": "0123456789ab", "set": "LR=3e-4"}))
    write_provenance(ablation, "pos_rope-no-qk_norm", attempt(**{
        "versions.torch": "2.5.1+cu121", "hostname": "node7", "device.gpu": "NVIDIA A100-SXM4-80GB"}))
    write_report(ablation)
    section = provenance_section(ablation)
    assert section == [
        "**The runs differ in 6 provenance fields** (latest attempt of each run); their differences are "
        "not only the configuration:",
        "- commit: `a1b2c3d4e5f6` (base, pos_rope-no-qk_norm); `ffffffffffff` (lr3e-4)",
        "- dirty: `no` (base, pos_rope-no-qk_norm); `yes` (lr3e-4)",
        "- changes: `none` (base, pos_rope-no-qk_norm); `0123456789ab` (lr3e-4)",
        "- torch: `2.6.0+cu124` (base, lr3e-4); `2.5.1+cu121` (pos_rope-no-qk_norm)",
        "- gpu: `NVIDIA H100 80GB HBM3` (base, lr3e-4); `NVIDIA A100-SXM4-80GB` (pos_rope-no-qk_norm)",
        "- hostname: `node1` (base, lr3e-4); `node7` (pos_rope-no-qk_norm)",
        "- SET differs (information: overrides may differ legitimately): `(none)` (base, pos_rope-no-qk_norm); "
        "`LR=3e-4` (lr3e-4)",
        "- No provenance.json (started by a runner that did not record it): `n_layer64`.",
    ]


def test_provenance_resumed_elsewhere(ablation):
    """The latest attempt is compared across runs; a run whose own attempts differ is flagged."""
    for name in ("base", "lr3e-4", "pos_rope-no-qk_norm", "n_layer64"):
        write_provenance(ablation, name, attempt())
    write_provenance(ablation, "lr3e-4", attempt(**{"hostname": "node3", "device.gpu_count": 2}),
                     attempt(time="2026-01-02T00:00:00", **{"set": "NPROC_PER_NODE=1"}),
                     attempt(time="2026-01-03T00:00:00"))
    write_report(ablation)
    section = provenance_section(ablation)
    assert section[0].startswith("All 4 runs: commit a1b2c3d4e5f6 (clean)")
    assert section[1:] == ["- **run `lr3e-4`: its 3 attempts differ** in gpu_count: `2` (attempt 1); "
                           "`1` (attempt 2, attempt 3); hostname: `node3` (attempt 1); `node1` (attempt 2, attempt 3)"]
    # A run that started over (no checkpoint) after attempts elsewhere: its outputs come from the new start only.
    write_provenance(ablation, "lr3e-4", attempt(hostname="node3", resumed=False),
                     attempt(time="2026-01-02T00:00:00", resumed=False),
                     attempt(time="2026-01-03T00:00:00", resumed=True))
    write_report(ablation)
    assert provenance_section(ablation) == section[:1]
    write_provenance(ablation, "lr3e-4", attempt(hostname="node5"), attempt(resumed=False),
                     attempt(hostname="node3", resumed=True))
    write_report(ablation)
    assert provenance_section(ablation)[2] == ("- **run `lr3e-4`: its 2 attempts differ** in hostname: "
                                               "`node1` (attempt 2); `node3` (attempt 3)")


def test_provenance_older_plans_and_no_git(ablation):
    write_report(ablation)  # a plan from before provenance.json: noted, not an error
    assert provenance_section(ablation) == [
        "No run has a provenance.json (a plan from before provenance was recorded, or no run has started)."]
    no_git = attempt(**{"git": {"commit": None, "dirty": None, "changes": None,
                                "reason": "git rev-parse: fatal: not a git repository"},
                        "device": {"gpu": None, "gpu_count": 0, "cpu": "Intel(R) Xeon(R)", "cpu_count": 2},
                        "versions": {"python": "3.11.7", "torch": "2.6.0+cpu", "cuda": None, "cudnn": None,
                                     "nccl": None}})
    write_provenance(ablation, "base", no_git)
    write_report(ablation)
    assert provenance_section(ablation) == [
        "Run `base`: no git commit (git rev-parse: fatal: not a git repository), Python 3.11.7, torch 2.6.0+cpu, "
        "device CPU Intel(R) Xeon(R) (2 CPUs), host node1.",
        "- No provenance.json (started by a runner that did not record it): `lr3e-4`, `pos_rope-no-qk_norm`, "
        "`n_layer64`."]


def time_limited(plan_dir: Path, name: str, steps: int, planned: int, final: float, plan_status="time_limit"):
    write_run(plan_dir, name, final, 10000.0, steps=steps)
    summary = json.loads((plan_dir / name / "summary.json").read_text())
    summary.update(status="time_limit", planned_steps=planned, final_lr=2.5e-4)
    (plan_dir / name / "summary.json").write_text(json.dumps(summary))


def test_time_limited_run_marked(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}},
                               {"name": "lr3e-3", "status": "time_limit", "differences": {"LR": 0.003}},
                               {"name": "lr1e-2", "differences": {"LR": 0.01}},  # plan.json says done
                               {"name": "moe", "status": "killed", "error": "killed by signal 9 (out of memory?)",
                                "differences": {"MOE": True}}])
    write_run(d, "base", 1.30, 12000.0)
    time_limited(d, "lr3e-3", 300, 600, 1.10)  # lower loss than base, but stopped half-way
    time_limited(d, "lr1e-2", 200, 600, 1.50)
    write_report(d)
    md = (d / "report.md").read_text()
    assert "1 done, 2 time limit, 1 killed" in md.splitlines()[0]
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert "| time limit (300/600 steps) † |" in table[1] and "| time limit (200/600 steps) † |" in table[2]
    assert "1.1000" in table[1] and "| killed |" in table[3] and table[3].endswith("(out of memory?) |")
    note = next(line for line in md.splitlines() if line.startswith("†"))
    assert "CONFIG_MAX_TIME" in note and "`lr3e-3` after 300 of 600 steps (LR 0.00025 when stopped)" in note
    assert "`lr1e-2` after 200 of 600 steps" in note
    best = next(line for line in md.splitlines() if line.startswith("Best run"))
    assert best == "Best run by final val loss: `base` (1.3000), the baseline."  # not the time-limited 1.10
    rows = read_csv(d)
    assert [r["status"] for r in rows] == ["done", "time_limit", "time_limit", "killed"]
    assert rows[1]["steps"] == "300" and rows[1]["planned_steps"] == "600" and float(rows[1]["final_lr"]) == 2.5e-4
    assert rows[0]["planned_steps"] == "" and "out of memory" in rows[3]["error"]


def test_all_runs_time_limited(tmp_path):
    """A plan that gives every run a fixed time: the best is chosen among them, and says so."""
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}, "status": "time_limit"},
                               {"name": "rope", "differences": {"POS_ROPE": True}, "status": "time_limit"}])
    time_limited(d, "base", 310, 1000, 1.40)
    time_limited(d, "rope", 290, 1000, 1.30)
    write_report(d)
    best = next(line for line in (d / "report.md").read_text().splitlines() if line.startswith("Best run"))
    assert best == ("Best run by final val loss, all runs stopped by their time limit: `rope` (1.3000), "
                    "-0.1000 (-7.14%) vs baseline `base` (1.4000).")
    # A finished run beats a time-limited baseline: the baseline is named, not compared.
    write_plan(d, "ablation", [{"name": "base", "baseline": True, "differences": {}, "status": "time_limit"},
                               {"name": "rope", "differences": {"POS_ROPE": True}}])
    write_run(tmp_path / "q", "rope", 1.35, 1000.0)
    (d / "rope" / "summary.json").write_bytes((tmp_path / "q" / "rope" / "summary.json").read_bytes())
    write_report(d)
    best = next(line for line in (d / "report.md").read_text().splitlines() if line.startswith("Best run"))
    assert best == ("Best run by final val loss: `rope` (1.3500); baseline `base` was stopped by its time limit "
                    "(310/1000 steps, 1.4000), not compared.")


def test_bits_per_byte_column_and_lineage(tmp_path):
    d = tmp_path / "warm"
    write_plan(d, "single", [{"name": "parent", "differences": {}}, {"name": "child", "differences": {}}])
    write_run(d, "parent", 1.30, 12000.0)
    write_run(d, "child", 1.10, 12000.0)
    parent = {"path": "runs/a/parent/checkpoints/best.pt", "step": 400, "weights_sha256": "ab" * 32,
              "val_loss": 1.30, "optimizer": False}
    for name, bpb, init in (("parent", 1.875, None), ("child", 1.5, parent)):
        summary = json.loads((d / name / "summary.json").read_text())
        summary.update(final_val_bpb=bpb, best_val_bpb=bpb, init_from=init)
        (d / name / "summary.json").write_text(json.dumps(summary))
    write_report(d)
    rows = read_csv(d)
    assert [float(r["final_val_bpb"]) for r in rows] == [1.875, 1.5]
    assert [r["init_from"] for r in rows] == ["", "runs/a/parent/checkpoints/best.pt@step 400"]
    md = (d / "report.md").read_text()
    assert "val bpb" in md.splitlines()[2] and "| 1.8750 |" in md and "| 1.5000 |" in md
    assert ("- `child` started from `runs/a/parent/checkpoints/best.pt` (step 400, val loss 1.3000 there, "
            "weights sha256 abababababab)") in md
    assert "`parent` started" not in md
    hf = {"path": "runs/a/parent/export/hf", "kind": "hf", "step": None, "weights_sha256": "cd" * 32,
          "val_loss": None, "optimizer": False}
    summary = json.loads((d / "child" / "summary.json").read_text())
    (d / "child" / "summary.json").write_text(json.dumps({**summary, "init_from": hf}))
    write_report(d)
    assert read_csv(d)[1]["init_from"] == "runs/a/parent/export/hf (Hugging Face folder)"
    assert ("- `child` started from `runs/a/parent/export/hf` (Hugging Face folder, weights sha256 cdcdcdcdcdcd)"
            in (d / "report.md").read_text())


# --------------------------------------------------------------------------- make eval results, bits per byte

def eval_result(acc: float, stderr: float | None = 0.03, bpb: float = 2.31, distinct_2: float = 0.62) -> dict:
    """summary.json's eval as make eval writes it."""
    scores = {"acc": acc, "acc_norm": acc + 0.03, "acc_norm_stderr": 0.035, "num_fewshot": 0, "samples": 200}
    if stderr is not None:
        scores["acc_stderr"] = stderr
    return {"checkpoint": "best", "step": 300, "tasks": {"python_next_line": scores},
            "val_bpb": {"val": bpb},
            "generation": {"distinct_1": 0.31, "distinct_2": distinct_2, "repeated_ngram_rate": 0.125,
                           "mean_length": 87.5, "samples": 8, "file": "eval/samples.txt"}}


def set_summary(plan_dir: Path, name: str, **fields) -> None:
    summary = json.loads((plan_dir / name / "summary.json").read_text())
    summary.update(fields)
    (plan_dir / name / "summary.json").write_text(json.dumps(summary))


def log_bpb(plan_dir: Path, name: str, scale: float) -> None:
    """Add val_bpb (val_loss * scale) to each evaluation line of the run's metrics.jsonl."""
    path = plan_dir / name / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**x, "val_bpb": x["val_loss"] * scale} if "val_loss" in x else x) + "\n"
                            for x in lines))


@pytest.fixture
def evaluated(ablation) -> Path:
    """The ablation with make eval run on two of its done runs, and val_bpb logged by all three."""
    set_summary(ablation, "base", eval=eval_result(0.41))
    set_summary(ablation, "lr3e-4", eval=eval_result(0.5, stderr=None, bpb=2.125, distinct_2=0.75))
    for name in ("base", "lr3e-4", "pos_rope-no-qk_norm"):
        log_bpb(ablation, name, 1.5)
    return ablation


def test_eval_columns_in_csv(evaluated):
    write_report(evaluated)
    rows = read_csv(evaluated)
    assert list(rows[0])[:len(COLUMNS)] == list(COLUMNS)
    assert list(rows[0])[len(COLUMNS):] == [
        "eval_checkpoint", "eval_step", "python_next_line acc", "python_next_line acc_stderr",
        "python_next_line acc_norm", "python_next_line acc_norm_stderr", "eval_bpb_val",
        "distinct_1", "distinct_2", "repeated_ngram_rate", "mean_length", "samples_file"]
    base, lr = rows[0], rows[1]
    assert (base["eval_checkpoint"], base["eval_step"]) == ("best", "300")
    assert float(base["python_next_line acc"]) == 0.41 and float(base["python_next_line acc_stderr"]) == 0.03
    assert float(lr["python_next_line acc"]) == 0.5 and lr["python_next_line acc_stderr"] == ""
    assert float(lr["python_next_line acc_norm"]) == 0.53
    assert [r["eval_bpb_val"] for r in rows] == ["2.31", "2.125", "", "", ""]
    assert float(base["distinct_2"]) == 0.62 and float(base["repeated_ngram_rate"]) == 0.125
    assert float(base["mean_length"]) == 87.5 and base["samples_file"] == "base/eval/samples.txt"
    assert rows[2]["python_next_line acc"] == "" and rows[2]["samples_file"] == ""  # not evaluated


def test_eval_section_in_markdown(evaluated):
    write_report(evaluated)
    md = (evaluated / "report.md").read_text()
    lines = md.splitlines()
    start = lines.index("## Evaluation")
    assert start < lines.index("## Provenance")
    assert lines[start + 2] == ("| run | checkpoint | python_next_line acc | python_next_line acc_norm | eval bpb | "
                                "distinct-2 | repeated 4-grams | mean length | samples |")
    assert lines[start + 4] == ("| `base` | best @ step 300 | 0.410 ± 0.030 | 0.440 ± 0.035 | 2.3100 | 0.620 | "
                                "0.125 | 87.5 tokens | [samples.txt](base/eval/samples.txt) |")
    assert lines[start + 5].startswith("| `lr3e-4` | best @ step 300 | 0.500 | 0.530 ± 0.035 | 2.1250 | 0.750 |")
    assert lines[start + 7].startswith("Tasks `python_next_line` (0-shot, 200 documents): ")
    assert lines[start + 8] == "Not evaluated ('make eval' has not run on them): `pos_rope-no-qk_norm`."
    assert "![eval](eval.png)" in md and "![loss](loss.png)" in md


def test_eval_and_bpb_plots_written(evaluated):
    paths = {p.name for p in write_report(evaluated)}
    assert paths == {*FILES, "eval.png"}
    assert png_size(evaluated / "eval.png")[0] > 100
    # Results gone (a plan evaluated before, then rewritten): the plots go too, the report is today's again.
    for name in ("base", "lr3e-4"):
        set_summary(evaluated, name, eval=None)
    write_report(evaluated)
    assert not (evaluated / "eval.png").exists() and "## Evaluation" not in (evaluated / "report.md").read_text()
    assert (evaluated / "loss.png").exists()


def test_report_without_eval_is_unchanged(ablation, tmp_path):
    """No run evaluated, no val_bpb logged: the columns and plots of a report before make eval existed."""
    paths = {p.name for p in write_report(ablation)}
    assert paths == FILES
    assert list(read_csv(ablation)[0]) == list(COLUMNS)
    md = (ablation / "report.md").read_text()
    assert "Evaluation" not in md and "eval.png" not in md


def test_partial_and_odd_eval_results_tolerated(ablation):
    """Eval without tasks (EVAL_TASKS empty), a task without stderr or settings, torn entries: no crash."""
    set_summary(ablation, "base", eval={"checkpoint": "latest", "tasks": {},
                                        "val_bpb": {"val": 2.0, "extra": None}, "generation": None})
    set_summary(ablation, "lr3e-4", eval={"tasks": {"boolq": {"acc": 0.6}, "broken": "n/a",
                                                    "lambada": {"perplexity": 35.5, "acc": 0.2}}})
    set_summary(ablation, "pos_rope-no-qk_norm", eval="not a dict")
    paths = {p.name for p in write_report(ablation)}
    assert "eval.png" in paths
    rows = read_csv(ablation)
    assert rows[0]["eval_checkpoint"] == "latest" and rows[0]["eval_step"] == ""
    assert float(rows[0]["eval_bpb_val"]) == 2.0 and rows[0]["eval_bpb_extra"] == ""
    assert float(rows[1]["boolq acc"]) == 0.6 and float(rows[1]["lambada perplexity"]) == 35.5
    assert rows[1]["boolq acc_stderr"] == "" and rows[0]["boolq acc"] == "" and rows[2]["boolq acc"] == ""
    md = (ablation / "report.md").read_text().splitlines()
    table = md[md.index("## Evaluation") + 2:]
    assert table[0] == ("| run | checkpoint | boolq acc | lambada perplexity | lambada acc | eval bpb | eval bpb extra | "
                        "distinct-2 | repeated 4-grams | mean length | samples |")
    assert table[2] == "| `base` | latest | – | – | – | 2.0000 | – | – | – | – | – |"
    assert table[3] == "| `lr3e-4` | ? | 0.600 | 35.500 | 0.200 | – | – | – | – | – | – |"
    assert table[5].startswith("Tasks `boolq`, `lambada`: ")
