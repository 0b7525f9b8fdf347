"""The make targets, exercised as a user would, in a temporary copy of the repository."""

from __future__ import annotations

import json

import pytest
from conftest import run_make


def test_help_lists_every_target(make):
    out = make("help").stdout
    for target in ("defconfig-<name>", "menuconfig", "olddefconfig", "savedefconfig", "list-defconfigs",
                   "run", "check", "sample", "bench", "test", "test-fast", "help", "defconfig-quickstart",
                   "defconfig-nanogpt-shakespeare-char-cpu"):
        assert target in out, target


def test_defconfig_targets_are_explicit_for_tab_completion(make):
    db = make("-pq", "help", check=False).stdout
    assert "\ndefconfig-quickstart:" in db


def test_make_without_config_says_what_to_do(make):
    p = make(check=False)
    assert p.returncode != 0
    assert "no configuration yet: run 'make defconfig-<name>'" in p.stderr


def test_bad_defconfig_stops_with_file_line_symbol_reason(repo, make):
    (repo / "defconfigs" / "broken").write_text(
        "# a preset with mistakes\nCONFIG_SEED=1\nCONFIG_N_LAYER=3\nCONFIG_LR=\"fast\"\n")
    p = make("defconfig-broken", check=False)
    assert p.returncode != 0
    assert "defconfigs/broken:3: CONFIG_N_LAYER=3: did not take: unmet dependency MODEL_SIZE_CUSTOM" in p.stderr
    assert 'defconfigs/broken:4: CONFIG_LR="fast": not a number' in p.stderr
    assert not (repo / ".config").exists(), "a failed defconfig writes nothing"


def test_unknown_defconfig(make):
    p = make("defconfig-nope", check=False)
    assert p.returncode != 0


def test_savedefconfig_and_olddefconfig(repo, make):
    make("defconfig-nanogpt-shakespeare-char-cpu")
    config_py = (repo / "config.py").read_text()
    assert "N_EMBD: int = 128" in config_py and "DATASET_SHAKESPEARE: bool = True" in config_py
    make("savedefconfig")
    saved = (repo / "defconfig").read_text()
    assert "CONFIG_BLOCK_SIZE=64" in saved and "CONFIG_SEED" not in saved
    (repo / "defconfigs" / "mine").write_text(saved)
    make("defconfig-mine")
    assert (repo / "config.py").read_text() == config_py
    make("olddefconfig")
    assert (repo / "config.py").read_text() == config_py


def test_set_override_is_validated(make):
    make("defconfig-quickstart")
    p = make("check", env={"SET": "MAX_ITERS=ten"}, check=False)
    assert p.returncode != 0 and "SET:1: CONFIG_MAX_ITERS: malformed integer 'ten'" in p.stderr


@pytest.mark.slow
def test_check_dry_run(repo, make):
    make("defconfig-nanogpt-shakespeare-char")
    out = make("check").stdout
    assert "base  ok" in out and "10.82M params" in out and "full size" in out and "check passed" in out
    out = make("check", env={"SET": "MODEL_SIZE_GPT2_MEDIUM=y"}).stdout
    assert "reduced twin" in out and "302.56M params" in out  # vocab 256: the check has no tokenizer
    out = make(env={"SET": "DRY_RUN=y"}).stdout
    assert "base  ok" in out and not (repo / "runs").exists()


@pytest.mark.slow
def test_quickstart_on_a_reduced_budget(repo, make):
    make("defconfig-quickstart")
    out = make(env={"SET": "MAX_ITERS=40 WARMUP_ITERS=4 EVAL_INTERVAL=20 LOG_INTERVAL=10 EVAL_BATCHES=4 SAMPLE_TOKENS=30"}).stdout
    plans = list((repo / "runs").iterdir())
    assert len(plans) == 1 and plans[0].name.startswith("quickstart-")
    plan = json.loads((plans[0] / "plan.json").read_text())
    assert [(r["name"], r["status"], r["error"]) for r in plan["runs"]] == [("base", "done", None)]
    assert plan["set"].startswith("MAX_ITERS=40") and plan["mode"] == "single"
    run_dir = plans[0] / "base"
    for name in (".config", "config.py", "metrics.jsonl", "summary.json", "train.log", "samples.txt",
                 "checkpoints/step-00000040.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert "CONFIG_MAX_ITERS=40" in (run_dir / ".config").read_text(), "SET is recorded in the run's config"
    assert "CONFIG_MAX_ITERS=600" in (repo / ".config").read_text(), "SET does not change .config"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["final_val_loss"] < summary["unigram_entropy_nats"]
    for words in ("run directory:", "final loss:", "unigram entropy:", "tokens/s", "sample:"):
        assert words in out
    sample = make("sample", env={"PROMPT": "import ", "TOKENS": "12"}).stdout
    assert sample.startswith("import ") and len(sample.rstrip("\n")) >= len("import ")


@pytest.mark.slow
def test_failed_run_is_recorded_in_the_plan(repo, make):
    make("defconfig-quickstart")
    p = make(env={"SET": "DATA_PATH=missing.txt MAX_ITERS=2 WARMUP_ITERS=1"}, check=False)
    assert p.returncode != 0 and "1 run(s) did not finish: base" in p.stdout
    plan = json.loads(next((repo / "runs").iterdir()).joinpath("plan.json").read_text())
    run = plan["runs"][0]
    assert run["status"] == "failed" and "missing.txt" in run["error"]


@pytest.mark.slow
def test_run_that_cannot_train_here_is_refused_before_the_plan_exists(repo, make):
    make("defconfig-quickstart")
    p = make(env={"SET": "DEVICE_CUDA=y MAX_ITERS=2 WARMUP_ITERS=1"}, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU on this machine" in p.stderr
    assert "nothing was created or trained" in p.stderr and not (repo / "runs").exists()
    p = make(env={"SET": "MODEL_SIZE_CUSTOM=y N_EMBD=30 N_HEAD=4"}, check=False)
    assert "error: CONFIG_N_EMBD=30 is not divisible by CONFIG_N_HEAD=4" in p.stderr and not (repo / "runs").exists()
    p = make("check", env={"SET": "MODEL_SIZE_CUSTOM=y N_EMBD=30 N_HEAD=4"}, check=False)
    assert p.returncode != 0 and "FAILED" in p.stdout and "CONFIG_N_EMBD=30 is not divisible" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    out = make("check", env={"SET": "DEVICE_CUDA=y"}).stdout  # a check on a laptop for a GPU machine
    assert "check passed" in out and "not on this machine: CONFIG_DEVICE_CUDA=y" in out


# what make must pass through untouched: $ (alone, as $VAR, $(...) and $$), quotes, backslashes, spaces
SET_VALUES = {"SAMPLE_PROMPT": "$HOME/x", "DATA_JSONL_FIELD": "$(shell touch {marker})",
              "DATA_PARQUET_COLUMN": "`touch {marker}`", "DATA_TEXT_SEPARATOR": 'say "hi"', "DATA_HF_CONFIG": "it's",
              "DATA_HF_SPLIT": "a\\b \\n", "SLURM_PARTITION": "  two  spaces ", "SLURM_ACCOUNT": "$$ and $",
              "SLURM_EXTRA": "#not a comment", "DATA_PATH": "%;&|<>*?[]{}~!"}


@pytest.mark.parametrize("how", ["command line", "environment"])
def test_set_reaches_kbuild_unexpanded_and_runs_nothing(repo, make, how, tmp_path):
    import shlex

    from kconfig.tree import parse_file, resolve

    from kconfig.values import values

    make("defconfig-quickstart")
    marker = tmp_path / "ran"
    want = {name: value.replace("{marker}", str(marker)) for name, value in SET_VALUES.items()}
    words = []
    for i, (name, value) in enumerate(want.items()):  # single quotes and double quotes, alternately
        double = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(f"{name}={shlex.quote(value) if i % 2 else double}")
    text = " ".join(words)
    p = make("savedefconfig", f"SET={text}") if how == "command line" else make("savedefconfig", env={"SET": text})
    cfg = values(resolve(parse_file(repo / "defconfig"))[0])
    assert {name: cfg[name] for name in want} == want, p.stdout
    assert not marker.exists(), "make ran a command found in SET"


def test_help_says_how_to_quote_set(make):
    assert "make SET='SAMPLE_PROMPT=$HOME' gives the text $HOME" in make("help").stdout


def test_syncconfig_accepts_menuconfigs_file_and_olddefconfig_repairs_a_cut_one(repo, make):
    import subprocess
    import sys

    from kconfig.tree import END_MARKER, parse_file, resolve

    make("defconfig-quickstart")
    dot = repo / ".config"
    kconf, _ = resolve(parse_file(dot, snapshot=True))
    kconf.write_config(str(dot), save_old=False)  # as menuconfig saves it: kconfiglib's own header, no marker
    assert END_MARKER not in dot.read_text()
    subprocess.run([sys.executable, "-m", "kbuild", "syncconfig"], cwd=repo, check=True, capture_output=True)
    assert dot.read_text().endswith(f"{END_MARKER}\n"), "syncconfig writes the marker back"
    text = dot.read_text()
    dot.write_text(text[:text.index("CONFIG_MAX_ITERS")])  # cut short, e.g. by a full disk
    p = make("check", check=False)
    assert p.returncode == 2 and f"{dot.name} is truncated: kbuild wrote it, but its final line" in p.stderr
    p = make("olddefconfig")
    assert f"warning: {dot} is truncated" in p.stderr and dot.read_text().endswith(f"{END_MARKER}\n")


def test_run_outside_make_dir_uses_run_make_helper(repo):
    assert run_make(repo, "list-defconfigs").stdout.count("defconfig-") >= 3


def test_hand_edited_config_is_validated_strictly(repo, make):
    make("defconfig-quickstart")
    dot = repo / ".config"
    dot.write_text(dot.read_text().replace('CONFIG_LR="2e-3"', 'CONFIG_LR="fast"'))
    p = make("check", check=False)
    line = next(i for i, l in enumerate(dot.read_text().splitlines(), 1) if l.startswith("CONFIG_LR="))
    assert f'.config:{line}: CONFIG_LR="fast": not a number' in p.stderr
    p = run_make(repo, "menuconfig", check=False, env={"TERM": "dumb"}, timeout=60)
    assert p.returncode != 0, "menuconfig without a terminal fails instead of writing anything"
    assert 'CONFIG_LR="fast"' in dot.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_stopped_plan_continues_without_redoing_done_runs(repo, how):
    """Stop a 3-run plan while its second run trains (a crash, or a polite SIGTERM as a cluster
    scheduler sends); 'make continue' finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_make(repo, "defconfig-matrix-optimizers")
    env = dict(os.environ, SET="MATRIX_OPT_LION=n MATRIX_OPT_MUON=n MATRIX_LRS= MATRIX_SEEDS=3 MAX_ITERS=40 WARMUP_ITERS=4 CHECKPOINT_INTERVAL=5 EVAL_INTERVAL=20 "
                              "EVAL_BATCHES=2 LOG_INTERVAL=5 SAMPLE_TOKENS=5 MICRO_BATCH=4 BLOCK_SIZE=64")
    proc = subprocess.Popen(["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    plan_file = None
    while time.time() < deadline:
        plan_file = next((repo / "runs").glob("*/plan.json"), None) if (repo / "runs").exists() else None
        if plan_file:
            runs = json.loads(plan_file.read_text())["runs"]
            second = plan_file.parent / runs[1]["name"] / "checkpoints"
            if runs[0]["status"] == "done" and runs[1]["status"] == "running" and any(second.glob("step-*.pt")):
                break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the plan never reached its second run")
    os.killpg(proc.pid, getattr(signal, how))
    proc.wait(timeout=60)
    if how == "SIGTERM":  # the run checkpoints and the plan records it (make itself may exit first)
        deadline = time.time() + 120
        while json.loads(plan_file.read_text())["runs"][1]["status"] == "running" and time.time() < deadline:
            time.sleep(0.2)
        record = json.loads(plan_file.read_text())
        log = (plan_file.parent / runs[1]["name"] / "train.log").read_text()
        assert [r["status"] for r in record["runs"]] == ["done", "interrupted", "pending"], log[-2000:]
    first = plan_file.parent / runs[0]["name"]
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    out = run_make(repo, "continue").stdout
    stopped = "(interrupted)" if how == "SIGTERM" else "(killed)"  # SIGKILL of the group: nothing recorded why
    assert "continuing" in out and stopped in out and "(pending)" in out
    record = json.loads(plan_file.read_text())
    assert [r["status"] for r in record["runs"]] == ["done", "done", "done"]
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before, "a done run is never touched"
    log = (plan_file.parent / runs[1]["name"] / "train.log").read_text()
    assert "resumed from step" in log
    steps = [json.loads(line)["step"] for line in
             (plan_file.parent / runs[1]["name"] / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 40, "no duplicated or missing log steps after resume"
    assert (plan_file.parent / "report.md").exists()
    assert "nothing to continue" in run_make(repo, "continue").stdout
