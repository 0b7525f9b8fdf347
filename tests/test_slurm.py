"""make slurm: the sbatch array script of a plan, run-one (one array task), and plan.json under concurrent updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import plan.slurm as slurm
from conftest import config_of
from kconfig.errors import ConfigError
from kconfig.tree import ROOT, parse_file, parse_overrides, resolve
from kconfig.values import values
from plan.plan import Plan
from plan.runner import UNFINISHED, claim, newest_unfinished_plan

TINY = ("MODEL_SIZE_CUSTOM=y N_LAYER=1 N_EMBD=32 N_HEAD=2 BLOCK_SIZE=32 MICRO_BATCH=2 MAX_ITERS=3 EVAL_INTERVAL=3 "
        "EVAL_BATCHES=1 LOG_INTERVAL=1 SAMPLE_TOKENS=5 EMBEDDED_CORPUS_MB=1 WARMUP_ITERS=1")
RESOURCES = ('SLURM_PARTITION=gpu SLURM_ACCOUNT=proj42 SLURM_GPUS_PER_TASK=2 SLURM_CPUS_PER_TASK=16 '
             'SLURM_MEM_GB=64 SLURM_TIME=1-02:00:00 SLURM_MAX_PARALLEL=2 SLURM_EXTRA="--qos=high; --constraint=h100"')


def slurm_plan_for(preset: str, set_: str, tmp_path):
    layers = [parse_file(ROOT / "defconfigs" / preset), parse_overrides(f"RUNS_DIR={tmp_path / 'runs'} {set_}")]
    kconf, _ = resolve(*layers)
    return slurm.slurm_plan(layers, values(kconf))


def bash_array(script, name="RUNS") -> list[str]:
    """The values of a bash array the script defines, as bash itself reads them."""
    body = script.read_text().split("set -euo pipefail")[1].split(f"{name}=(")[1].split(")\n")[0]
    out = subprocess.run(["bash", "-c", f'{name}=({body}); printf "%s\\n" "${{{name}[@]}}"'],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_matrix_script_has_one_task_per_pending_run_and_the_configured_resources(tmp_path):
    # 3 optimizers x {fp32, fp16}: the three fp16 cells are rejected on CPU and stay out of the array
    plan, script = slurm_plan_for("matrix-optimizers", f'MATRIX_LRS="1e-3" MATRIX_SEEDS=1 MATRIX_DTYPE_FP32=y '
                                                       f'MATRIX_DTYPE_FP16=y {TINY} {RESOURCES}', tmp_path)
    assert script == plan.path / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    directives = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [f"--job-name={plan.path.name}", "--array=0-2%2",
                          f"--output={plan.path}/slurm-%A_%a.out", "--nodes=1", "--ntasks-per-node=1",
                          "--partition=gpu", "--account=proj42", "--gpus-per-task=2", "--cpus-per-task=16",
                          "--mem=64G", "--time=1-02:00:00", "--qos=high", "--constraint=h100"]
    assert text.index("#SBATCH") < text.index("set -euo pipefail"), "sbatch reads directives before any command"
    on_disk = json.loads((plan.path / "plan.json").read_text())
    pending = [r["name"] for r in on_disk["runs"] if r["status"] == "pending"]
    rejected = [r["name"] for r in on_disk["runs"] if r["status"] == "rejected"]
    assert len(pending) == 3 and len(rejected) == 3 and all("-fp16" in n for n in rejected)
    assert bash_array(script) == pending
    assert f"exec {sys.executable} -m kbuild run-one \"$PLAN_DIR\" \"$RUN\"" in text
    assert on_disk["runner_pid"] is None, "no live process claims a plan that Slurm runs"


def test_defaults_leave_optional_directives_out(tmp_path):
    _, script = slurm_plan_for("quickstart", f"RUN_MATRIX=y MATRIX_SEEDS=2 SLURM_GPUS_PER_TASK=0 {TINY}", tmp_path)
    text = script.read_text()
    assert "#SBATCH --array=0-1\n" in text and "#SBATCH --time=04:00:00\n" in text
    assert "#SBATCH --cpus-per-task=8\n" in text
    for absent in ("--partition", "--account", "--gpus-per-task", "--mem", "srun"):
        assert absent not in text, absent


@pytest.mark.parametrize("value", ["4h", "25:00", "1-25:00:00", "04:60:00", ""])
def test_bad_time_limit_is_a_named_error_and_creates_no_plan(tmp_path, value):
    with pytest.raises(ConfigError, match=f'CONFIG_SLURM_TIME="{value}": not a time limit; write HH:MM:SS'):
        slurm_plan_for("quickstart", f'SLURM_TIME="{value}"', tmp_path)
    assert not (tmp_path / "runs").exists()


def test_bad_extra_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"CONFIG_SLURM_EXTRA=.*'qos=high' is not an sbatch option"):
        slurm_plan_for("quickstart", 'SLURM_EXTRA="--exclusive;qos=high"', tmp_path)


@pytest.mark.slow
def test_array_task_trains_its_run_and_make_continue_takes_the_rest(tmp_path):
    plan, script = slurm_plan_for("quickstart", f"RUN_MATRIX=y MATRIX_SEEDS=2 {TINY}", tmp_path)
    assert bash_array(script) == ["seed1337", "seed1338"]
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="4242")
    task = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert task.returncode == 0, task.stdout + task.stderr
    plan = Plan.load(plan.path)
    first, second = plan.runs
    assert (first["status"], second["status"]) == ("pending", "done")
    assert second["slurm_job"] == "4242" and second["start"] and second["end"]
    assert json.loads((plan.run_dir("seed1338") / "summary.json").read_text())["steps"] == 3
    assert not (plan.run_dir("seed1337") / "summary.json").exists()

    with pytest.raises(slurm.RunRefused, match="run seed1338 of plan .* is done; nothing to train"):
        slurm.run_one(plan.path, "seed1338")
    with pytest.raises(slurm.RunRefused, match=r"no run 'nope' in plan .*runs: seed1337, seed1338"):
        slurm.run_one(plan.path, "nope")

    # 'make continue' picks the plan up (Slurm's tasks left no live runner_pid) and trains only seed1337
    assert newest_unfinished_plan(tmp_path / "runs").path == plan.path
    claim(plan)
    assert [r["name"] for r in Plan.load(plan.path).runs if r["status"] in UNFINISHED] == ["seed1337"]


def test_run_one_refuses_a_rejected_run_from_the_command_line(tmp_path):
    from kbuild.__main__ import main

    plan, _ = slurm_plan_for("matrix-optimizers", f'MATRIX_LRS="1e-3" MATRIX_SEEDS=1 MATRIX_OPT_LION=n '
                                                  f'MATRIX_OPT_MUON=n MATRIX_DTYPE_FP32=y MATRIX_DTYPE_FP16=y {TINY}',
                             tmp_path)
    rejected = next(r["name"] for r in plan.runs if r["status"] == "rejected")
    assert main(["run-one", str(plan.path), rejected]) == 2


def test_multi_node_task_starts_one_run_one_per_node_with_rank_and_rendezvous(tmp_path):
    plan, script = slurm_plan_for("quickstart", f"PARALLEL_DDP=y NNODES=2 NPROC_PER_NODE=1 {TINY}", tmp_path)
    text = script.read_text()
    assert "#SBATCH --nodes=2\n" in text and "srun --nodes=2 --ntasks-per-node=1" in text
    # stand-ins for Slurm's scontrol and srun (srun starts the command once per node) and for python
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_ / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ $1 == --* ]]; do shift; done
        for id in 0 1; do SLURM_NODEID=$id "$@"; done
        """))
    fake_python = bin_ / "python"
    fake_python.write_text('#!/bin/sh\n'
                           'echo "rank=$NODE_RANK rdzv=$RDZV_ENDPOINT master=$MASTER_ADDR:$MASTER_PORT $*"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = slurm.write_script(plan, slurm.SlurmSettings.from_config(config_of()), 2, str(fake_python))
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="0",
               SLURM_JOB_NODELIST="node-[a-b]")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"rank={rank} rdzv=node-a:29500 master=node-a:29500 -m kbuild run-one {plan.path} base"
                                for rank in (0, 1)]


def test_other_nodes_wait_for_node_zero_then_train_the_same_run(tmp_path, monkeypatch):
    plan, _ = slurm_plan_for("quickstart", TINY, tmp_path)
    started = []
    monkeypatch.setattr(slurm, "train_command",
                        lambda cfg, run_dir, resume: started.append((run_dir, resume)) or ["true"])
    monkeypatch.setattr(slurm, "FOLLOWER_WAIT_S", 0)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(RuntimeError, match="node 1: node 0 did not start run base of job 77"):
        slurm.run_one(plan.path, "base")
    plan.update("base", status="running", slurm_job="77")  # what node 0's run-one records once it started
    assert slurm.run_one(plan.path, "base") == 0
    assert started == [(plan.run_dir("base"), False)]
    assert Plan.load(plan.path).run_by_name("base")["status"] == "running", "only node 0 writes plan.json"


def test_concurrent_updates_of_different_runs_all_survive(tmp_path):
    plan = Plan.create(tmp_path, "locks", "matrix", [{"name": "a"}, {"name": "b"}])
    writer = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from plan.plan import Plan
        plan = Plan.load({str(plan.path)!r})  # each process starts from the same record
        for i in range(1, 41):
            plan.update(sys.argv[1], count=i, status="running")
        """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, name]) for name in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    runs = Plan.load(plan.path).runs
    assert [(r["name"], r.get("count"), r["status"]) for r in runs] == [("a", 40, "running"), ("b", 40, "running")]
    assert sorted(p.name for p in plan.path.iterdir()) == ["plan.json"], "the lock leaves no file behind"


def test_make_slurm_prints_the_sbatch_command(repo, make, tmp_path):
    assert "\n    slurm " in make("help").stdout
    make("defconfig-quickstart")
    out = make("slurm", env={"SET": f"RUNS_DIR={tmp_path / 'out'} {TINY}"}).stdout
    [script] = (tmp_path / "out").glob("quickstart-*/slurm.sbatch")
    assert f"sbatch {script}" in out
    assert f"cd {repo}\n" in script.read_text()


@pytest.mark.parametrize("extra, reason", [
    ("--qos=high\ntouch /tmp/x", "the value contains a newline character"),  # refused by the resolver itself
    ("--qos=high;--comment=$(id)", "'--comment=$(id)' contains '$', which an '#SBATCH' line cannot carry"),
    ("--comment=a b", "'--comment=a b' contains ' '"),
    ("--comment='x'", "contains \"'\""),
    ("--comment=x\\y", "contains '\\\\'"),
    ("--comment=x#y", "contains '#'"),
    ("qos=high", "'qos=high' is not an sbatch option"),
    ("--9=x", "'--9=x' is not an sbatch option"),
])
def test_extra_options_that_an_sbatch_line_cannot_carry_are_refused(tmp_path, extra, reason):
    import shlex

    with pytest.raises(ConfigError) as e:
        slurm_plan_for("quickstart", f"SLURM_EXTRA={shlex.quote(extra)} {TINY}", tmp_path)
    assert "CONFIG_SLURM_EXTRA" in e.value.problems[0] and reason in e.value.problems[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sym, value", [("SLURM_PARTITION", "gpu'x"), ("SLURM_ACCOUNT", "a$b"), ("SLURM_ACCOUNT", "a#b")])
def test_partition_and_account_are_plain_names(tmp_path, sym, value):
    import shlex

    with pytest.raises(ConfigError, match=f"CONFIG_{sym}=.*not a Slurm name"):
        slurm_plan_for("quickstart", f"{sym}={shlex.quote(value)} {TINY}", tmp_path)


@pytest.mark.parametrize("folder", ["a b", "a%b", "it's", 'q"q', "d$x"])
def test_runs_dir_an_output_directive_cannot_carry_is_refused_before_the_plan(tmp_path, folder):
    import shlex

    runs = tmp_path / folder
    with pytest.raises(ConfigError, match="CONFIG_RUNS_DIR: the path .* '#SBATCH --output=' line cannot carry"):
        slurm.slurm_plan(*_layers_and_cfg(f"RUNS_DIR={shlex.quote(str(runs))} {TINY}"))
    assert not runs.exists()


def _layers_and_cfg(set_: str):
    layers = [parse_file(ROOT / "defconfigs" / "quickstart"), parse_overrides(set_)]
    return layers, values(resolve(*layers)[0])


def test_shell_lines_quote_every_value_and_the_printed_command_too(tmp_path, monkeypatch, capsys):
    import shlex

    import kbuild.__main__ as cli
    from kconfig.tree import write_outputs

    runs = tmp_path / "a&b(c);d|e"  # fine for '#SBATCH' lines, which no shell reads; dangerous in shell lines
    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / "quickstart"), parse_overrides(f"RUNS_DIR={shlex.quote(str(runs))} {TINY}"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    monkeypatch.setattr(cli, "DOT_CONFIG", tmp_path / ".config")
    assert cli.main(["slurm", "--set", ""]) == 0
    [script] = runs.glob("quickstart-*/slurm.sbatch")
    printed = capsys.readouterr().out.splitlines()[-1].strip()
    assert shlex.split(printed) == ["sbatch", str(script)]
    subprocess.run(["bash", "-n", str(script)], check=True)
    body = script.read_text().split("set -euo pipefail")[1].split("RUN=")[0]
    out = subprocess.run(["bash", "-c", body + 'printf "%s" "$PLAN_DIR"'], capture_output=True, text=True, check=True)
    assert out.stdout == str(script.parent)
    assert f"#SBATCH --output={script.parent}/slurm-%A_%a.out\n" in script.read_text()


def test_a_control_character_in_a_path_never_reaches_the_script(tmp_path):
    plan = Plan.create(tmp_path, "p", "single", [{"name": "base"}])
    settings = slurm.SlurmSettings("", "", 1, 8, 0, "04:00:00", 0, ())
    with pytest.raises(ConfigError, match="the Python interpreter '/x\\\\n/python' contains a newline"):
        slurm.script_text(plan, ["base"], settings, 1, "/x\n/python")
