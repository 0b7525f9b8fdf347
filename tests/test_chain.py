"""Chained plans (RUN_MODE chain): stages and sweeps expanded into runs that start from their parent's run,
run in dependency order, continued without redoing a finished stage, submitted to Slurm with dependencies,
dry-run by 'make check' and shown in the report's Chain section."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import plan.expand as expand_mod
from kconfig.errors import ConfigError
from kconfig.tree import ROOT, load, parse_file, parse_overrides, resolve
from kconfig.values import values
from plan import runner
from plan.check import check_plan
from plan.expand import PARENT_PLACEHOLDER, expand, parse_stages
from plan.plan import Plan
from plan.report import write_report

TINY = ("MODEL_SIZE_CUSTOM=y N_LAYER=1 N_EMBD=32 N_HEAD=2 BLOCK_SIZE=32 MICRO_BATCH=2 MAX_ITERS=4 EVAL_INTERVAL=4 "
        "EVAL_BATCHES=1 LOG_INTERVAL=1 SAMPLE_TOKENS=5 EMBEDDED_CORPUS_MB=1 WARMUP_ITERS=1 "
        'EVAL_TASKS="" EVAL_BPB_TOKENS=2000 EVAL_GEN_SAMPLES=1 EVAL_GEN_TOKENS=5')
FRAGMENTS = {"lr2": 'CONFIG_LR="0.002"', "seed7": "CONFIG_SEED=7", "drop": 'CONFIG_DROPOUT="0.1"',
             "latest": "CONFIG_INIT_FROM_CHECKPOINT_LATEST=y", "wide": "CONFIG_N_EMBD=64",
             "sets-init": 'CONFIG_INIT_FROM="runs/x/base"', "bad": "CONFIG_NOPE=1"}


@pytest.fixture
def fragments(tmp_path, monkeypatch):
    """Stage fragments of the tests' own, in a temporary defconfigs/fragments/."""
    folder = tmp_path / "fragments"
    folder.mkdir()
    for name, line in FRAGMENTS.items():
        (folder / name).write_text(f"# test fragment {name}\n{line}\n")
    monkeypatch.setattr(expand_mod, "FRAGMENTS", folder)
    return folder


def chain(tmp_path, stages: str, set_: str = ""):
    """(base Config, layers) of the quickstart preset as a chain of ``stages``, runs under tmp_path/runs."""
    layers = [parse_file(ROOT / "defconfigs" / "quickstart"),
              parse_overrides(f'RUNS_DIR={tmp_path / "runs"} RUN_CHAIN=y CHAIN_STAGES="{stages}" {TINY} {set_}')]
    return values(resolve(*layers)[0]), layers


def specs_of(tmp_path, stages: str, set_: str = ""):
    cfg, layers = chain(tmp_path, stages, set_)
    return expand(layers, cfg)


# --------------------------------------------------------------------------- expansion


def test_stages_start_from_their_parent_and_a_sweep_branches_into_a_tree(tmp_path, fragments):
    specs = specs_of(tmp_path, "pretrain= sft=lr2+[seed7|drop|] dpo=lr2")
    assert [(s.name, s.stage, s.parent) for s in specs] == [
        ("pretrain", "pretrain", None),
        ("sft-seed7", "sft", "pretrain"), ("sft-drop", "sft", "pretrain"), ("sft", "sft", "pretrain"),
        ("dpo-seed7", "dpo", "sft-seed7"), ("dpo-drop", "dpo", "sft-drop"), ("dpo", "dpo", "sft")]
    assert not any(s.rejected for s in specs)
    first, seeded, dropped = specs[0].cfg, specs[1].cfg, specs[2].cfg
    assert first.INIT_FROM == "" and first.RUN_SINGLE, "the first stage starts as configured, a single run"
    assert (seeded.INIT_FROM, seeded.INIT_FROM_CHECKPOINT) == (f"{PARENT_PLACEHOLDER}pretrain", "best")
    assert (seeded.SEED, seeded.LR, dropped.SEED, dropped.DROPOUT) == (7, 0.002, first.SEED, 0.1)
    assert specs[4].cfg.INIT_FROM == f"{PARENT_PLACEHOLDER}sft-seed7" and specs[4].cfg.SEED == first.SEED
    assert specs[1].differences == {"SEED": 7}, "the chain's own INIT_FROM layer is the parent column, no difference"


def test_the_parent_checkpoint_is_chosen_for_the_chain_and_a_stage_may_override_it(tmp_path, fragments):
    specs = specs_of(tmp_path, "a= b= c=latest", "CHAIN_PARENT_CHECKPOINT_LATEST=y")
    assert [s.cfg.INIT_FROM_CHECKPOINT for s in specs] == [None, "latest", "latest"]
    specs = specs_of(tmp_path, "a= b= c=latest")
    assert [s.cfg.INIT_FROM_CHECKPOINT for s in specs] == [None, "best", "latest"]
    assert specs[2].differences == {"INIT_FROM_CHECKPOINT_LATEST": True}, "set by the stage's own fragment"


def test_create_plan_points_init_from_at_the_parent_run_and_records_stage_and_parent(tmp_path, fragments):
    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop]")
    plan = runner.create_plan(cfg, expand(layers, cfg))
    record = json.loads((plan.path / "plan.json").read_text())
    assert record["mode"] == "chain" and record["chain_eval"] is True
    assert [(r["name"], r["stage"], r["parent"]) for r in record["runs"]] == [
        ("pretrain", "pretrain", None), ("sft-seed7", "sft", "pretrain"), ("sft-drop", "sft", "pretrain")]
    for name in ("sft-seed7", "sft-drop"):
        run_cfg = load(plan.run_dir(name) / ".config")[1]
        assert run_cfg.INIT_FROM == str(plan.run_dir("pretrain")) and run_cfg.RUN_SINGLE
    assert load(plan.run_dir("pretrain") / ".config")[1].INIT_FROM == ""


@pytest.mark.parametrize("stages, words", [
    ("a= b=x[y]", "malformed sweep in stage 'b=x[y]'"),
    ("a= b=[y|y]", "stage 'b=[y|y]' lists an alternative twice"),
    ("a= b=x++y", "an empty fragment name between '+' signs"),
    ("a= b=[x]|", "malformed sweep in stage 'b=[x]|'"),
    ("a= b=[x][y]", "malformed sweep"),
    ("=lr2", "malformed stage '=lr2'"),
    ("a= a=lr2", "two stages are named 'a'"),
    ("", "CONFIG_CHAIN_STAGES is empty"),
    ("a= b=missing", "CONFIG_CHAIN_STAGES: no fragment 'missing'"),
])
def test_malformed_stages_are_named_errors(tmp_path, fragments, stages, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")
                       .replace("+", r"\+")):
        specs_of(tmp_path, stages)


def test_a_sweep_group_keeps_the_fragments_around_it(fragments):
    (stage,) = parse_stages("sft=lr2+[seed7|drop+latest|]+wide")
    assert stage.variants == (("seed7", ("lr2", "seed7", "wide")), ("drop+latest", ("lr2", "drop", "latest", "wide")),
                              ("", ("lr2", "wide")))


def test_a_stage_fragment_may_not_set_init_from(tmp_path, fragments):
    with pytest.raises(ConfigError, match=r"sets-init:2: CONFIG_INIT_FROM: fragment of chain stage 'sft': a chain "
                                          r"sets each stage's INIT_FROM to its parent stage's run"):
        specs_of(tmp_path, "pretrain= sft=sets-init")


def test_a_rejected_stage_rejects_the_stages_after_it(tmp_path, fragments):
    specs = specs_of(tmp_path, "pretrain= sft=[bad|seed7] dpo=lr2")
    state = {s.name: s.error for s in specs}
    assert "CONFIG_NOPE: unknown symbol" in state["sft-bad"]
    assert state["dpo-bad"] == "its parent stage's run sft-bad is rejected, so it cannot start from it"
    assert state["pretrain"] is state["sft-seed7"] is state["dpo-seed7"] is None


# --------------------------------------------------------------------------- running


def fake_training(tmp_path, monkeypatch, failing=()):
    """Runs 'trained' by a process that writes a done summary.json (or exits 1 for a run in ``failing``);
    returns the names in the order they were started. No data is prepared."""
    started = []
    monkeypatch.setattr(runner, "prepare", lambda cfg, root: None)
    monkeypatch.setattr(runner, "data_problems", lambda cfg, data: [])

    def start(plan, name, gpu):
        started.append(name)
        plan.update(name, status="running")
        code = ("import sys; sys.exit(1)" if name in failing else
                f"open({str(plan.run_dir(name) / 'summary.json')!r}, 'w').write('{{\"status\": \"done\"}}')")
        return subprocess.Popen([sys.executable, "-c", code])

    monkeypatch.setattr(runner, "start_run", start)
    return started


@pytest.mark.slow
def test_a_failed_stage_blocks_its_branch_with_the_reason_and_the_other_branches_go_on(tmp_path, fragments,
                                                                                      monkeypatch):
    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop] dpo=lr2 last=", "CHAIN_EVAL=n")
    plan = runner.create_plan(cfg, expand(layers, cfg))
    started = fake_training(tmp_path, monkeypatch, failing={"sft-seed7"})
    runner.execute(plan)
    assert started == ["pretrain", "sft-seed7", "sft-drop", "dpo-drop", "last-drop"], "each after its parent"
    runs = {r["name"]: r for r in Plan.load(plan.path).runs}
    assert [runs[n]["status"] for n in ("pretrain", "sft-seed7", "sft-drop", "dpo-drop", "last-drop")] == ["done",
                                                                                                      "failed", "done", "done", "done"]
    assert runs["dpo-seed7"]["status"] == runs["last-seed7"]["status"] == "blocked"
    assert runs["dpo-seed7"]["error"].startswith("not run: its parent stage's run sft-seed7 is failed: training "
                                                 "exited with code 1")
    assert runs["last-seed7"]["error"].startswith("not run: its parent stage's run dpo-seed7 is blocked")
    assert "eval" not in runs["pretrain"], "CHAIN_EVAL=n evaluates nothing"
    assert runner.newest_unfinished_plan(tmp_path / "runs").path == plan.path, "blocked runs are continued"


@pytest.mark.slow
def test_on_several_gpus_siblings_train_at_once_and_children_wait_for_their_parent(tmp_path, fragments,
                                                                                  monkeypatch):
    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop] dpo=lr2", "CHAIN_EVAL=n")
    plan = runner.create_plan(cfg, expand(layers, cfg))
    started = fake_training(tmp_path, monkeypatch)
    fake_start, seen = runner.start_run, []

    def start(plan, name, gpu):  # what was training, and the parent's status, when each run started
        parent = plan.run_by_name(name).get("parent")
        seen.append((name, gpu, parent and plan.run_by_name(parent)["status"],
                     sorted(r["name"] for r in plan.runs if r["status"] == "running")))
        return fake_start(plan, name, gpu)

    monkeypatch.setattr(runner, "start_run", start)
    monkeypatch.setattr(runner, "_device_slots", lambda: ["0", "1"])
    runner.execute(plan)
    assert started == ["pretrain", "sft-seed7", "sft-drop", "dpo-seed7", "dpo-drop"]
    assert seen[0] == ("pretrain", "0", None, []), "nothing else can start before the first stage is done"
    assert seen[1] == ("sft-seed7", "0", "done", []) and seen[2] == ("sft-drop", "1", "done", ["sft-seed7"]), \
        "siblings share the parent and train side by side"
    assert all(parent_status == "done" for _, _, parent_status, _ in seen[1:])
    assert {r["status"] for r in Plan.load(plan.path).runs} == {"done"}


def test_a_failing_evaluation_is_recorded_and_the_chain_goes_on(tmp_path, fragments, monkeypatch):
    import evaluation.run

    cfg, layers = chain(tmp_path, "pretrain= sft=lr2")
    plan = runner.create_plan(cfg, expand(layers, cfg))
    fake_training(tmp_path, monkeypatch)
    evaluated = []

    def evaluate(run_dir, config, gen_config, root, which):
        evaluated.append((run_dir.name, which, config.bpb_tokens, gen_config.samples))
        if run_dir.name == "pretrain":
            raise ConfigError(["CONFIG_EVAL_TASKS: no task 'nope'"])

    monkeypatch.setattr(evaluation.run, "evaluate_run", evaluate)
    runner.execute(plan)
    assert evaluated == [("pretrain", "best", 2000, 1), ("sft", "best", 2000, 1)], "each with its run's config"
    runs = {r["name"]: r for r in Plan.load(plan.path).runs}
    assert (runs["pretrain"]["status"], runs["pretrain"]["eval"]) == ("done", "failed")
    assert runs["pretrain"]["eval_error"] == "CONFIG_EVAL_TASKS: no task 'nope'"
    assert (runs["sft"]["status"], runs["sft"]["eval"], runs["sft"]["eval_error"]) == ("done", "done", None)


@pytest.mark.slow
def test_continue_after_a_killed_stage_never_redoes_the_finished_parent(tmp_path, fragments, monkeypatch):
    cfg, layers = chain(tmp_path, "pretrain= sft=lr2 dpo=seed7")
    plan = runner.create_plan(cfg, expand(layers, cfg))
    real_start = runner.start_run

    def killed_sft(plan, name, gpu):  # the out-of-memory killer takes sft's trainer as it starts
        proc = real_start(plan, name, gpu)
        if name == "sft":
            proc.kill()
        return proc

    monkeypatch.setattr(runner, "start_run", killed_sft)
    runner.execute(plan)
    runs = {r["name"]: r for r in Plan.load(plan.path).runs}
    assert [runs[n]["status"] for n in ("pretrain", "sft", "dpo")] == ["done", "killed", "blocked"]
    assert runs["pretrain"]["eval"] == "done"
    parent = plan.run_dir("pretrain")
    kept = {p.relative_to(parent): p.stat().st_mtime_ns for p in parent.rglob("*") if p.is_file()}

    monkeypatch.setattr(runner, "start_run", real_start)  # 'make continue': claim, prepare, execute
    runner.claim(plan)
    runner.prepare_to_continue(plan, ["sft", "dpo"])
    runner.execute(plan)
    runs = {r["name"]: r for r in Plan.load(plan.path).runs}
    assert [runs[n]["status"] for n in ("pretrain", "sft", "dpo")] == ["done", "done", "done"]
    assert len(runs["pretrain"]["attempts"]) == 1 and len(runs["sft"]["attempts"]) == 2
    assert {p.relative_to(parent): p.stat().st_mtime_ns for p in parent.rglob("*") if p.is_file()} == kept, \
        "the finished parent is neither retrained nor re-evaluated"
    sft = json.loads((plan.run_dir("sft") / "summary.json").read_text())
    dpo = json.loads((plan.run_dir("dpo") / "summary.json").read_text())
    assert sft["init_from"]["path"] == str(parent / "checkpoints" / "best.pt")
    assert dpo["init_from"]["path"] == str(plan.run_dir("sft") / "checkpoints" / "best.pt")
    assert dpo["init_from"]["val_loss"] == sft["best_val_loss"] and dpo["steps"] == 4
    assert all(json.loads((plan.run_dir(n) / "summary.json").read_text())["eval"]["checkpoint"] == "best"
               for n in ("pretrain", "sft", "dpo"))

    write_report(plan.path)
    report = (plan.path / "report.md").read_text()
    section = report.split("## Chain\n\n")[1].split("\n\n")[0].splitlines()
    assert section[0] == "| stage | run | parent | status | best val loss | final val loss | eval bpb | evaluation |"
    assert section[2].startswith("| pretrain | `pretrain` | (first stage) | done | ")
    assert section[3].startswith(f"| sft | `sft` | `pretrain` | done | {sft['best_val_loss']:.4f} | ")
    assert section[4].startswith("| dpo | `dpo` | `sft` | done | ") and section[4].endswith(" | done |")
    assert "Best run by final val loss" not in report, "stages on different data are not ranked"
    csv_head = (plan.path / "report.csv").read_text().splitlines()[0].split(",")
    assert csv_head[4:6] == ["stage", "parent"]


# --------------------------------------------------------------------------- slurm and check


def test_slurm_submits_each_run_after_its_parents_task(tmp_path, fragments):
    import plan.slurm as slurm

    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop] dpo=lr2")
    plan, submit = slurm.slurm_plan(layers, cfg)
    assert submit == plan.path / "submit.sh" and (plan.path / "slurm.sbatch").is_file()
    subprocess.run(["bash", "-n", str(submit)], check=True)
    jobs = [line for line in submit.read_text().splitlines() if line.startswith("JOB_")]
    assert jobs == [
        "JOB_0=$(submit --array=0)  # pretrain",
        "JOB_1=$(submit --array=1 --dependency=afterok:$JOB_0 --kill-on-invalid-dep=yes)  # sft-seed7 after pretrain",
        "JOB_2=$(submit --array=2 --dependency=afterok:$JOB_0 --kill-on-invalid-dep=yes)  # sft-drop after pretrain",
        "JOB_3=$(submit --array=3 --dependency=afterok:$JOB_1 --kill-on-invalid-dep=yes)  # dpo-seed7 after sft-seed7",
        "JOB_4=$(submit --array=4 --dependency=afterok:$JOB_2 --kill-on-invalid-dep=yes)  # dpo-drop after sft-drop"]
    assert f"# Submit: bash {submit} (a chain: each task after its parent stage's)\n" in (plan.path / "slurm.sbatch").read_text()
    runs = "\n".join(f"  {r['name']}" for r in plan.runs)
    assert f"RUNS=(\n{runs}\n)" in (plan.path / "slurm.sbatch").read_text(), "task i is run i of the script"
    with pytest.raises(slurm.RunRefused, match=r"run sft-seed7 of plan .* starts from its parent stage's run "
                                               r"pretrain, which is pending; submit a chain with .*submit.sh"):
        slurm.run_one(plan.path, "sft-seed7")


def test_slurm_does_not_submit_the_children_of_a_run_that_cannot_train(tmp_path, fragments, monkeypatch):
    import plan.slurm as slurm

    monkeypatch.setattr(slurm, "data_problems", lambda cfg, data: ["data: too short"] if cfg.SEED == 7 else [])
    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop] dpo=lr2")
    plan, submit = slurm.slurm_plan(layers, cfg)
    state = {r["name"]: r["status"] for r in Plan.load(plan.path).runs}
    assert state == {"pretrain": "pending", "sft-seed7": "failed", "sft-drop": "pending", "dpo-seed7": "blocked",
                     "dpo-drop": "pending"}
    assert [line.split("  # ")[1] for line in submit.read_text().splitlines() if line.startswith("JOB_")] == [
        "pretrain", "sft-drop after pretrain", "dpo-drop after sft-drop"]
    assert "--dependency=afterok:$JOB_1 " in submit.read_text(), "dpo-drop after task 1 of the array: sft-drop"


def test_check_builds_every_stage_without_reading_the_untrained_parents(tmp_path, fragments, capsys):
    cfg, layers = chain(tmp_path, "pretrain= sft=[seed7|drop] dpo=lr2")
    assert check_plan(layers, cfg) == 0
    out = capsys.readouterr().out
    assert "=== check: 5 run(s)" in out and out.count(" ok ") == 5 and "check passed" in out
    assert not (tmp_path / "runs").exists(), "check creates no plan"

    cfg, layers = chain(tmp_path, "pretrain= wider=wide sft=[bad|seed7]")
    # stages do not accumulate: sft-seed7 is the base (N_EMBD=32) + seed7, so it cannot start from wider either
    assert check_plan(layers, cfg) == 3
    out = capsys.readouterr().out
    assert re.search(r"\nwider +FAILED +[0-9.]+s  stage wider cannot start from its parent pretrain: tensor shapes "
                     r"differ \(wte\.weight \(256, 32\) -> \(256, 64\), .*\); settings that differ: n_embd 32 -> 64 \(CONFIG_N_EMBD\); "
                     r"a stage's fragments must keep its parent's model shape\n", out), out
    assert re.search(r"\nsft-seed7 +FAILED +[0-9.]+s  stage sft cannot start from its parent wider", out)
    assert re.search(r"\nsft-bad +rejected .*CONFIG_NOPE: unknown symbol", out)


@pytest.mark.slow
def test_make_check_and_make_slurm_on_a_chain(repo, make, tmp_path):
    (repo / "defconfigs" / "fragments" / "seed7").write_text("# test fragment: another seed\nCONFIG_SEED=7\n")
    make("defconfig-quickstart")
    chain_set = f'RUNS_DIR={tmp_path / "out"} RUN_CHAIN=y CHAIN_STAGES="pretrain= sft=seed7" {TINY}'
    out = make("check", env={"SET": chain_set}).stdout
    assert "=== check: 2 run(s)" in out and re.search(r"\nsft +ok ", out) and "check passed" in out
    out = make("slurm", env={"SET": chain_set}).stdout
    [submit] = (tmp_path / "out").glob("quickstart-*/submit.sh")
    assert f"submit with:\n  bash {submit}\n" in out
    assert "JOB_1=$(submit --array=1 --dependency=afterok:$JOB_0 --kill-on-invalid-dep=yes)  # sft after pretrain" \
        in submit.read_text()


def test_check_lets_a_stage_grow_the_vocabulary_but_not_change_the_width(tmp_path, fragments):
    from plan.check import parent_shape_problem

    (fragments / "bpe").write_text("# bpe\nCONFIG_TOKENIZER_BPE=y\nCONFIG_BPE_VOCAB_SIZE=1024\n")
    parent, grown, wide = specs_of(tmp_path, "pretrain= grown=bpe wide=wide")
    assert grown.cfg.TOKENIZER == "bpe" and parent_shape_problem(grown, parent) is None, "special tokens may grow it"
    assert parent_shape_problem(wide, grown).startswith("stage wide cannot start from its parent grown: ")
