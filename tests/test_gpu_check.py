"""scripts/gpu_check.py and scripts/gpu_wheels.py: the prepared GPU check's dry run on CPU, its
failure and budget handling, and the wheel download commands (no network here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import gpu_check, gpu_wheels  # noqa: E402

STEPS = ["wheels", "tests", "memory", "bench"]


def run_check(out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", str(out), "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    return done, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_dry_run_records_every_step_with_its_figures(tmp_path):
    done, data = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(data["steps"]) == STEPS
    assert data["dry_run"] is True and data["finished"] is not None
    env = data["environment"]
    for key in ("torch", "cuda", "device", "capability", "python", "command", "git"):
        assert key in env
    assert env["command"][1:] == ["scripts/gpu_check.py", str(tmp_path), "--dry-run"]
    assert len(env["git"]["commit"]) == 40
    steps = data["steps"]
    assert steps["wheels"]["status"] == "skipped"
    for name in ("tests", "memory", "bench"):
        assert steps[name]["status"] == "passed", steps[name]
        assert 0 < steps[name]["seconds"] <= steps[name]["budget_s"]

    counts = steps["tests"]["counts"]  # the GPU tier under GPU_CHECK_DRY_RUN=1, from its JUnit XML
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    assert counts["passed"] + counts["skipped"] == counts["tests"]

    memory = steps["memory"]["result"]["items"]
    assert len(memory) >= 6
    assert {"gpt2-bf16-eager", "gpt2-bf16-compiled", "llama-bf16-eager", "llama-bf16-compiled",
            "gpt2-moe-bf16-eager", "gpt2-act-ckpt-bf16-eager"} <= set(memory)
    for name, item in memory.items():
        assert item["status"] == "done", (name, item)
        assert item["measured_bytes"] > 0 and item["predicted_bytes"] > 0
        expected = 100 * (item["predicted_bytes"] - item["measured_bytes"]) / item["measured_bytes"]
        assert item["error_pct"] == pytest.approx(expected, abs=1e-3)
        assert item["within_target"] == (abs(item["error_pct"]) <= 10)
        assert item["compiled"] is False  # eager on CPU, even where COMPILE=y was asked for
    assert memory["gpt2-act-ckpt-bf16-eager"]["checkpoint_every"] == 1
    assert memory["gpt2-bf16-compiled"]["compile_requested"] is True
    assert steps["memory"]["result"]["max_abs_error_pct"] == max(abs(i["error_pct"]) for i in memory.values())

    bench = steps["bench"]["result"]["items"]
    for name in ("gpt2-bf16-eager", "gpt2-bf16-compiled", "gpt2-moe-bf16-eager", "llama-bf16-compiled"):
        assert bench[name]["status"] == "done", (name, bench[name])
        assert bench[name]["tokens_per_s"] > 0 and bench[name]["flops_per_token"] > 0
        assert bench[name]["mfu"] is None  # no peak FLOP/s for a CPU
    layer = bench["moe-layer-vs-dense-mlp"]
    assert layer["experts"] == 8 and layer["top_k"] == 2 and layer["moe_tokens_per_s"] > 0
    for name in ("nanogpt-bf16-eager", "nanogpt-bf16-compiled"):
        assert bench[name] == {"status": "skipped", "reason": "no --nanogpt"}
    for name in ("llama-fp8-tensorwise-compiled", "llama-fp8-rowwise-compiled"):
        assert bench[name]["status"] == "skipped" and "CUDA" in bench[name]["reason"]
    figures = steps["bench"]["result"]["figures"]
    assert figures["moe_vs_dense_model"] == pytest.approx(
        bench["gpt2-moe-bf16-eager"]["tokens_per_s"] / bench["gpt2-bf16-eager"]["tokens_per_s"])
    assert figures["fp8_tensorwise_vs_bf16"] is None and figures["gpt2_compiled_vs_nanogpt_compiled"] is None
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== memory: passed" in log and "[bench] gpt2-bf16-eager: done" in log


@pytest.mark.slow
def test_a_failing_step_is_recorded_and_the_next_still_runs_and_is_stopped_at_its_budget(tmp_path):
    """GPU_CHECK_FAIL makes the memory step raise; bench runs after it and, over a 2 s budget, is
    killed and recorded as a timeout; the steps left out by --only are skipped."""
    done, data = run_check(tmp_path, "--only", "memory,bench", "--budget", "bench=2",
                           env={"GPU_CHECK_FAIL": "memory"})
    assert done.returncode == 1
    steps = data["steps"]
    assert list(steps) == STEPS
    assert steps["tests"] == {"status": "skipped", "reason": "not in --only", "seconds": 0.0}
    memory = steps["memory"]
    assert memory["status"] == "failed" and memory["exit_code"] == 1
    assert any("failing it on purpose" in line for line in memory["output_tail"])
    assert memory["result"]["items"] == {}  # written before the raise: the step's file is always there
    bench = steps["bench"]
    assert bench["status"] == "timeout" and bench["budget_s"] == 2
    assert "stopped at its budget of 2 s" in bench["error"]
    assert data["finished"] is not None


def test_unknown_step_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path), "--only", "memory,speed"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown step(s) speed" in done.stderr
    with pytest.raises(SystemExit, match="STEP=SECONDS"):
        gpu_check.parse_budgets("memory=fast", gpu_check.BUDGETS)
    assert gpu_check.parse_budgets("bench=30", gpu_check.BUDGETS)["bench"] == 30


def test_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase classname="tests.gpu.test_a" name="test_ok"/>'
                   '<testcase classname="tests.gpu.test_a" name="test_bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.gpu.test_b" name="test_s1"><skipped/></testcase>'
                   '<testcase classname="tests.gpu.test_b" name="test_s2"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 2, "passed": 1,
                                           "failed_tests": ["tests.gpu.test_a::test_bad"]}


def test_budgets_fit_one_device_call():
    """Under 8 minutes for the steps together, inside the 10 minutes one command may run."""
    assert sum(gpu_check.BUDGETS.values()) - gpu_check.BUDGETS["wheels"] <= 8 * 60
    assert sum(gpu_check.BUDGETS.values()) < 10 * 60


def test_wheel_commands_target_the_gpu_machine(tmp_path):
    commands = gpu_wheels.pip_commands(tmp_path / "w", "3.12", "2.11", pip=["pip"])
    assert [c[2] for c in commands] == ["kconfiglib==14.1.0", "torchao==0.18.0"]
    for command in commands:
        assert command[:2] == ["pip", "download"]
        assert "--no-deps" in command and "--only-binary=:all:" in command
        assert command[command.index("--python-version") + 1] == "3.12"
        assert command[command.index("--platform") + 1] == "manylinux_2_28_x86_64"
        assert command[command.index("--dest") + 1] == str(tmp_path / "w")
    with pytest.raises(gpu_wheels.WheelError, match="no torchao release recorded for torch 2.5"):
        gpu_wheels.pip_commands(tmp_path, "3.12", "2.5.1")


def test_wheels_print_shows_the_commands_and_downloads_nothing(tmp_path, capsys):
    assert gpu_wheels.main(["--print", "--dest", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(" download " in line and "--python-version 3.12" in line for line in out)
    assert not (tmp_path / "w").exists()
    assert gpu_wheels.main(["--print", "--torch", "2.4"]) == 2


def test_wheels_folder_is_ignored_and_named_where_the_check_installs_from():
    done = subprocess.run(["git", "check-ignore", "-q", "wheels/torchao-0.18.0-cp310-abi3.whl"], cwd=ROOT)
    assert done.returncode == 0
    assert gpu_check.WHEELS == ROOT / "wheels"
    assert set(gpu_check.NEEDED) == {r.split("==")[0] for r in gpu_wheels.requirements("2.11")}


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel (what pip needs: the package, METADATA, WHEEL, RECORD)."""
    import zipfile

    folder.mkdir()
    info = "gpucheckprobe-1.0.dist-info"
    files = {"gpucheckprobe/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / "gpucheckprobe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_wheels_step_installs_what_is_missing_offline_onto_every_steps_path(tmp_path, monkeypatch):
    _probe_wheel(tmp_path / "wheels")
    monkeypatch.setattr(gpu_check, "NEEDED", ("gpucheckprobe",))
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(gpu_check, "SITE", tmp_path / "site")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    args = type("Args", (), {"budgets": gpu_check.BUDGETS, "dry_run": False})()
    check = gpu_check.Check(tmp_path / "out", args)
    entry = gpu_check.step_wheels(check)
    assert entry["status"] == "passed" and entry["installed"] == ["gpucheckprobe"], entry
    assert "--no-index" in entry["command"] and entry["target"] == str(tmp_path / "site")
    assert os.environ["PYTHONPATH"] == str(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", "import gpucheckprobe; print(gpucheckprobe.VALUE)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "42"
    assert gpu_check.step_wheels(check)["status"] == "skipped"  # importable now: nothing to do

    monkeypatch.setattr(gpu_check, "NEEDED", ("gpucheckabsent",))
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "nowheels")
    entry = gpu_check.step_wheels(check)
    assert entry["status"] == "failed" and "scripts/gpu_wheels.py" in entry["error"]


def test_a_tier_cut_short_is_counted_from_its_verbose_lines():
    text = ("tests/gpu/test_a.py::test_one PASSED [ 25%]\n"
            "tests/gpu/test_a.py::test_two[bf16] FAILED [ 50%]\n"
            "tests/gpu/test_b.py::test_three SKIPPED (no CUDA) [ 75%]\n"
            "other output\n")
    counts = gpu_check.verbose_counts(text)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (3, 1, 1, 1)
    assert counts["failed_tests"] == ["tests/gpu/test_a.py::test_two[bf16]"]
