"""Command line behind the Makefile: python -m kbuild <command> (see 'make help').

The top layer: it imports the configuration reader here and plan, data and train inside the
commands that use them, so the configuration commands ('make defconfig-x', menuconfig,
savedefconfig, list-defconfigs) start in a fraction of a second without importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import shutil
import sys
from pathlib import Path

from kconfig.atomic import write_text_if_changed
from kconfig.diff import config_values, diff_files, diff_lines
from kconfig.errors import ConfigError, NamedError
from kconfig.tree import (KCONFIG, ROOT, completeness_problem, load, load_layers, parse_file, parse_overrides, resolve,
                          write_min_config, write_outputs)
from kconfig.values import values

DEFCONFIGS = ROOT / "defconfigs"


def typed_view(config_file: Path) -> Path:
    """Where the typed view of a configuration goes: config.py beside a .config, else <file>.py."""
    name = "config.py" if config_file.name == ".config" else config_file.name + ".py"
    return config_file.with_name(name)


# The configuration every command reads and writes: $KCONFIG_CONFIG (as in the kernel), else .config.
DOT_CONFIG = Path(os.environ.get("KCONFIG_CONFIG") or ROOT / ".config").absolute()
CONFIG_PY = typed_view(DOT_CONFIG)


def shown(path: Path) -> Path:
    """A path as messages show it: relative to the current folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def defconfig_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    if "/" in name:
        raise ConfigError([f"{name}: no such file; 'make savedefconfig' writes ./defconfig, or choose a preset "
                           f"with 'make defconfig-<name>' (see 'make list-defconfigs')"])
    p = DEFCONFIGS / name
    if not p.is_file():
        raise ConfigError([f"no defconfig named {name!r} in {DEFCONFIGS}; see 'make list-defconfigs'"])
    return p


def describe_defconfig(path: Path) -> str:
    """The first comment line of a defconfig is its one-line description."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and not line.startswith("# CONFIG_"):
            return line.lstrip("# ").strip()
    return ""


def cmd_defconfig(args) -> int:
    path = defconfig_path(args.name)
    # savedefconfig writes nothing but a blank file for an all-default configuration
    kconf, _ = resolve(parse_file(path, allow_empty=args.saved), parse_overrides(args.set))
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print(f"configured from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
          f"wrote {shown(DOT_CONFIG)} and {shown(CONFIG_PY)}")
    return 0


def cmd_olddefconfig(args) -> int:
    old = parse_file(DOT_CONFIG, snapshot=True) if DOT_CONFIG.exists() else []
    kconf, problems = resolve(old, parse_overrides(args.set), lenient=True)
    for p in problems:
        print(f"warning: dropped: {p}", file=sys.stderr)
    if DOT_CONFIG.exists() and (gap := completeness_problem(DOT_CONFIG, old, kconf)):
        print(f"warning: {gap.split('; run ')[0]}; symbols it lacks now have their defaults: check them "
              f"with 'make menuconfig'", file=sys.stderr)
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print(f"updated {shown(DOT_CONFIG)} and {shown(CONFIG_PY)} to the current Kconfig tree")
    return 0


def cmd_syncconfig(args) -> int:
    """After menuconfig: validate .config strictly (float fields are free text there) and regenerate config.py.
    With --after-edit (the menus), a configuration that fails is set aside as <file>.rejected and the one
    before the edit (<file>.old, which the menus keep) is put back, if it passes: a bad save never
    replaces the last good configuration."""
    try:
        kconf, _ = load(DOT_CONFIG)
    except ConfigError as e:
        old = DOT_CONFIG.with_name(DOT_CONFIG.name + ".old")
        if not args.after_edit or not old.is_file():
            raise
        try:
            load(old)
        except ConfigError:
            raise e from None  # the previous one fails too: nothing good to put back
        rejected = DOT_CONFIG.with_name(DOT_CONFIG.name + ".rejected")
        os.replace(DOT_CONFIG, rejected)
        shutil.copy2(old, DOT_CONFIG)
        raise ConfigError(e.problems + [f"the edit was not kept: it is in {shown(rejected)}; {shown(DOT_CONFIG)} is "
                                        f"the configuration from before it ({shown(old)}); run the menu again and "
                                        "fix the values named above"]) from None
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print(f"validated {shown(DOT_CONFIG)} and regenerated {shown(CONFIG_PY)}")
    return 0


def cmd_oldconfig(args) -> int:
    """kconfiglib's oldconfig (asks for the symbols the configuration does not set); 'make oldconfig'
    then validates its result strictly (syncconfig)."""
    argv, cwd = sys.argv, os.getcwd()
    os.environ["KCONFIG_CONFIG"] = str(DOT_CONFIG)
    sys.argv = ["oldconfig", str(KCONFIG)]
    os.chdir(ROOT)  # Kconfig's 'source' paths are relative to the top of the tree
    try:
        runpy.run_module("oldconfig", run_name="__main__")
    except EOFError:
        raise ConfigError([f"oldconfig: the input ended before every new symbol had an answer; nothing was "
                           f"written to {shown(DOT_CONFIG)}. Answer on a terminal, feed the answers "
                           f"(printf '7\\n' | make oldconfig), or give new symbols their defaults with "
                           f"'make olddefconfig'"]) from None
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return 0


def cmd_setconfig(args) -> int:
    """A persistent edit (the kernel's scripts/config): SET applied to the configuration, strictly."""
    if not args.set.strip():
        raise ConfigError(["setconfig: SET is empty: name the values to write, e.g. "
                           "make setconfig SET='LR=1e-3 MAX_ITERS=200'"])
    kconf, _ = load(DOT_CONFIG, args.set)  # every assignment and rule checked; nothing written on failure
    before, old_values = DOT_CONFIG.read_text(encoding="utf-8"), config_values(DOT_CONFIG)
    old = DOT_CONFIG.with_name(DOT_CONFIG.name + ".old")
    staged = DOT_CONFIG.with_name(f".{DOT_CONFIG.name}.setconfig")  # the new text, to compare before writing
    try:
        write_outputs(kconf, staged, staged.with_name(staged.name + ".py"))
        after, changes = staged.read_text(encoding="utf-8"), diff_lines(old_values, config_values(staged))
    finally:
        staged.unlink(missing_ok=True)
        staged.with_name(staged.name + ".py").unlink(missing_ok=True)
    if after == before:
        print(f"no change: {shown(DOT_CONFIG)} already holds these values")
        return 0
    write_text_if_changed(old, before)  # the kernel's .config.old: the previous configuration
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    for line in changes:
        print(line)
    print(f"wrote {shown(DOT_CONFIG)} (the previous one is {shown(old)}) and {shown(CONFIG_PY)}")
    return 0


def config_file_of(name: str) -> Path:
    """A configuration file named for diffconfig: a file, a run directory (its .config) or a plan
    directory (its baseline run's .config, found in plan.json)."""
    p = Path(name)
    if p.is_file():
        return p
    if (p / ".config").is_file():
        return p / ".config"
    if (p / "plan.json").is_file():
        runs = json.loads((p / "plan.json").read_text(encoding="utf-8"))["runs"]
        base = [r["name"] for r in runs if r.get("baseline")]
        if base and (p / base[0] / ".config").is_file():
            return p / base[0] / ".config"
        names = ", ".join(r["name"] for r in runs)
        raise ConfigError([f"{p}: the plan has no baseline run with a .config to compare; name one of its "
                           f"runs instead ({names}), e.g. {p / runs[0]['name']}" if runs else
                           f"{p}: the plan has no runs"])
    raise ConfigError([f"{name}: not a configuration file, a run directory (with .config) or a plan "
                       f"directory (with plan.json)"])


def cmd_diffconfig(args) -> int:
    """The kernel's scripts/diffconfig between two configurations (default: <config>.old and <config>)."""
    a = args.a or str(DOT_CONFIG) + ".old"
    b = args.b or str(DOT_CONFIG)
    for line in diff_files(config_file_of(a), config_file_of(b)):
        print(line)
    return 0


def cmd_savedefconfig(args) -> int:
    kconf, _ = load(DOT_CONFIG, args.set)
    write_min_config(kconf, Path(args.out))
    print(f"wrote the minimal configuration to {args.out} (copy it into defconfigs/ to make a preset)")
    return 0


def cmd_list_defconfigs(args) -> int:
    for p in sorted(DEFCONFIGS.iterdir()):
        if p.is_file():
            print(f"  defconfig-{p.name:<32} {describe_defconfig(p)}")
    fragments = DEFCONFIGS / "fragments"
    if fragments.is_dir():
        print("\nFragments (for CONFIG_ABLATION_STEPS, CONFIG_MATRIX_FRAGMENTS and CONFIG_CHAIN_STAGES):")
        for p in sorted(fragments.iterdir()):
            if p.is_file():
                print(f"  {p.name:<42} {describe_defconfig(p)}")
    return 0


def cmd_run(args) -> int:
    layers, _, cfg = load_layers(DOT_CONFIG, args.set)
    if cfg.DRY_RUN:
        return cmd_check(args)
    from plan.expand import expand
    from plan.runner import create_plan

    specs = expand(layers, cfg)
    preflight(specs, here=True)  # before the plan exists: a run that cannot train leaves nothing behind
    plan = create_plan(cfg, specs, args.set)
    return finish(plan)


def preflight(specs, here: bool) -> None:
    """Refuse a plan with a run that cannot train (plan/preflight.py), naming the run and the symbols."""
    from plan.preflight import problems

    found = [(s.name, p) for s in specs if not s.rejected for p in problems(s.cfg, here)]
    if found:
        one = len(specs) == 1
        raise ConfigError([p if one else f"run {name}: {p}" for name, p in found]
                          + ["nothing was created or trained; fix the configuration (make menuconfig, or SET=...)"])


def cmd_continue(args) -> int:
    from plan.runner import claim, newest_unfinished_plan, prepare_to_continue, runs_dir

    # SET may move RUNS_DIR: look for the plan where the overrides say plans are
    here = parse_file(DOT_CONFIG, snapshot=True) if DOT_CONFIG.exists() else []
    root = runs_dir(values(resolve(here, parse_overrides(args.set))[0]))
    plan = newest_unfinished_plan(root)
    if plan is None:
        print(f"nothing to continue: every plan under {root} is finished")
        return 0
    unfinished = [r["name"] for r in plan.runs if r["status"] not in ("done", "rejected")]
    claim(plan)  # refuses a plan another live process runs, before anything of it changes
    # e.g. another world size: SET="NPROC_PER_NODE=1"; a model change is refused at resume
    prepare_to_continue(plan, unfinished, args.set)
    if args.set:
        print(f"applied SET={args.set!r} to the runs to continue")
    print(f"continuing {plan.path.name}: " + ", ".join(f"{r['name']} ({r['status']})" for r in plan.runs
                                                       if r["name"] in unfinished))
    return finish(plan)


def finish(plan) -> int:
    """Train what is left of a plan, then report."""
    from plan.report import write_report
    from plan.runner import execute, print_summary

    execute(plan)
    print_summary(plan)
    written = write_report(plan.path)
    if written:
        print("report: " + ", ".join(str(p) for p in written))
    return 0 if all(r["status"] in ("done", "rejected") for r in plan.runs) else 1


def cmd_slurm(args) -> int:
    """Create the plan as 'run' does and write its sbatch array script instead of training."""
    from plan.slurm import SUBMIT, slurm_plan

    layers, _, cfg = load_layers(DOT_CONFIG, args.set)
    plan, script = slurm_plan(layers, cfg, args.set)  # a chain's script is submit.sh: one sbatch per stage run
    todo = [r["name"] for r in plan.runs if r["status"] == "pending"]
    submit = "bash" if script.name == SUBMIT else "sbatch"
    print(f"plan: {plan.path} ({len(plan.runs)} run{'s' if len(plan.runs) != 1 else ''}, "
          f"{len(todo)} in the array)\nsubmit with:\n  {submit} {shlex.quote(str(script))}")
    return 0


def cmd_run_one(args) -> int:
    from plan.slurm import run_one

    return run_one(Path(args.plan_dir), args.run)


def cmd_report(args) -> int:
    """One plan's report into its folder; several (PLANS) into one report across them (REPORT_DIR, else
    runs/report-<a>+<b>/ beside the first)."""
    from plan.plots_curves import CurveOptions
    from plan.report import write_report
    from plan.runner import runs_dir

    plans = [Path(p) for p in args.plans.split()] or ([Path(args.plan)] if args.plan else [])
    if not plans:
        root = runs_dir(load(DOT_CONFIG)[1]) if DOT_CONFIG.exists() else ROOT / "runs"
        newest = newest_plan_dir(root)
        if newest is None:
            print(f"error: no plan under {root}; run 'make' first", file=sys.stderr)
            return 1
        plans = [newest]
    missing = [str(p) for p in plans if not (p / "plan.json").is_file()]
    if missing:
        print(f"error: no plan.json in {', '.join(missing)}: PLAN/PLANS name plan directories (runs/<plan>)",
              file=sys.stderr)
        return 1
    options = CurveOptions(x=args.x, logx=args.logx)
    for p in write_report(*plans, out=Path(args.out) if args.out else None, options=options):
        print(p)
    return 0


def cmd_check(args) -> int:
    from plan.check import check_plan

    layers, _, cfg = load_layers(DOT_CONFIG, args.set)
    return 1 if check_plan(layers, cfg) else 0


def cmd_data(args) -> int:
    """Prepare the data the configuration needs (make does it on demand too)."""
    from data.cache import prepared_path
    from data.dataset import source_for
    from data.prepare import prepare

    _, cfg = load(DOT_CONFIG, args.set)
    if args.reprepare:
        if cfg.DATA_MIX or cfg.DATA_VAL_EXTRA:  # a mix's folders are keyed by its shared tokenizer
            mix = prepare(cfg, ROOT)
            folders = [m.data.path for m in mix.members] + [d.path for _, d in mix.extras]
        else:  # found without preparing: a tokenizer mismatch is what REPREPARE is for
            folders = [prepared_path(cfg, ROOT, source_for(cfg, ROOT))]
        for out in folders:
            if out.exists():
                print(f"data: removing {out}")
                shutil.rmtree(out)
    data = prepare(cfg, ROOT)
    m = data.manifest
    print(f"data: {data.path}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens, "
          f"{m['tokenizer']['kind']} tokenizer, vocab {m['tokenizer']['vocab_size']}")
    return 0


def cmd_sample(args) -> int:
    from plan.runner import runs_dir
    from plan.plan import newest_run_dir
    from train.sample import parse_stop_strings, sample_from

    if args.top_p is not None and not 0 <= args.top_p <= 1:
        raise ConfigError([f"TOP_P={args.top_p:g}: top-p is a probability mass within [0, 1] (1 = off)"])
    stop = None if args.stop is None else parse_stop_strings(args.stop, "STOP")
    _, cfg = load(DOT_CONFIG) if DOT_CONFIG.exists() else (None, None)
    run_dir = Path(args.run) if args.run else newest_run_dir(runs_dir(cfg) if cfg else ROOT / "runs")
    if run_dir is None:
        print("error: no run with a checkpoint yet; train one with 'make' first", file=sys.stderr)
        return 1
    print(sample_from(run_dir, args.prompt, args.tokens, top_p=args.top_p, stop=stop))
    return 0


def cmd_export(args) -> int:
    from export.hf_folder import export_run
    from plan.plan import newest_run_dir
    from plan.runner import runs_dir

    _, cfg = load(DOT_CONFIG) if DOT_CONFIG.exists() else (None, None)
    run_dir = Path(args.run) if args.run else newest_run_dir(runs_dir(cfg) if cfg else ROOT / "runs")
    if run_dir is None:
        print("error: no run with a checkpoint yet; train one with 'make' first", file=sys.stderr)
        return 1
    export_run(run_dir, args.checkpoint)
    return 0


def cmd_eval(args) -> int:
    from evaluation.generation import GenerationConfig
    from evaluation.run import evaluate_run
    from harness.evaluate import EvalConfig
    from plan.plan import Plan
    from plan.runner import runs_dir

    # The Evaluation and Sampling symbols: .config's (or Kconfig's defaults without one) and SET's.
    cfg = load(DOT_CONFIG, args.set)[1] if DOT_CONFIG.exists() else values(resolve(parse_overrides(args.set))[0])
    if args.run:
        run_dirs = [Path(args.run)]
    else:
        plan_dir = Path(args.plan) if args.plan else newest_plan_dir(runs_dir(cfg) if DOT_CONFIG.exists() else
                                                                     ROOT / "runs")
        if plan_dir is None:
            print("error: no plan yet; train one with 'make' first (or name one: RUN_DIR= or PLAN=)", file=sys.stderr)
            return 1
        plan = Plan.load(plan_dir)
        run_dirs = [plan.run_dir(r["name"]) for r in plan.runs
                    if (plan.run_dir(r["name"]) / "summary.json").is_file()]
        if not run_dirs:
            print(f"error: {plan_dir}: no finished run to evaluate yet", file=sys.stderr)
            return 1
    eval_config, gen_config = EvalConfig.from_config(cfg, ROOT), GenerationConfig.from_config(cfg)
    for run_dir in run_dirs:
        evaluate_run(run_dir, eval_config, gen_config, ROOT, args.checkpoint)
        print(f"eval: results in {run_dir / 'summary.json'} (\"eval\") and {run_dir / 'eval' / 'results.json'}")
    return 0


def newest_plan_dir(root: Path) -> Path | None:
    from plan.plan import Plan

    plans = [Plan.load(f.parent) for f in root.glob("*/plan.json")]
    return max(plans, key=lambda p: p.record["created"]).path if plans else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kbuild", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--set", default=os.environ.get("SET", ""),
                       help='one-shot overrides: "NAME=value NAME2=value" (default: $SET, as make passes it)')
        p.set_defaults(fn=fn)
        return p

    p = add("defconfig", cmd_defconfig, "load a defconfig strictly")
    p.add_argument("name")
    p.add_argument("--saved", action="store_true",
                   help="the file is savedefconfig's output, which is empty for an all-default configuration")
    add("olddefconfig", cmd_olddefconfig, "update .config to the current Kconfig tree")
    add("syncconfig", cmd_syncconfig, "validate .config strictly and regenerate config.py").add_argument(
        "--after-edit", action="store_true",
        help="after a menu: a failing configuration is set aside as <file>.rejected and <file>.old put back")
    add("oldconfig", cmd_oldconfig, "ask for the symbols the configuration does not set yet (kconfiglib's oldconfig)")
    add("setconfig", cmd_setconfig, "write SET's values into .config, strictly (the previous one kept as .config.old)")
    p = add("diffconfig", cmd_diffconfig, "differences between two configurations, as scripts/diffconfig prints them")
    p.add_argument("a", nargs="?", default=os.environ.get("A", ""),
                   help=".config file, run directory or plan directory (default: $A, else .config.old)")
    p.add_argument("b", nargs="?", default=os.environ.get("B", ""),
                   help="the same for the other side (default: $B, else .config)")
    add("savedefconfig", cmd_savedefconfig, "write a minimal defconfig").add_argument("--out", default="defconfig")
    add("list-defconfigs", cmd_list_defconfigs, "list presets")
    add("run", cmd_run, "run the configured plan")
    add("check", cmd_check, "CPU dry run of every planned run")
    add("continue", cmd_continue, "finish the newest unfinished plan")
    add("slurm", cmd_slurm, "create the plan and write its sbatch array script (one task per run)")
    p = add("run-one", cmd_run_one, "train one run of a plan and record it in plan.json (a Slurm array task)")
    p.add_argument("plan_dir")
    p.add_argument("run")
    add("data", cmd_data, "prepare the configured data").add_argument(
        "--reprepare", action="store_true", default=bool(os.environ.get("REPREPARE")),
        help="delete this configuration's prepared data first (default: $REPREPARE)")
    p = add("report", cmd_report, "table and plots for a plan, or one report across several")
    p.add_argument("--plan", default=os.environ.get("PLAN", ""), help="plan directory (default: $PLAN, else the newest)")
    p.add_argument("--plans", default=os.environ.get("PLANS", ""),
                   help="plan directories, space-separated: one report across them (default: $PLANS)")
    p.add_argument("--out", default=os.environ.get("REPORT_DIR", ""),
                   help="where the report goes (default: $REPORT_DIR, else the plan's folder; across plans "
                        "runs/report-<a>+<b>/ beside the first)")
    p.add_argument("--x", choices=("tokens", "step", "time"), default=os.environ.get("REPORT_X") or "tokens",
                   help="the loss curves' x axis (default: $REPORT_X, else tokens)")
    p.add_argument("--logx", action="store_true", default=os.environ.get("REPORT_LOGX", "") in ("1", "y", "yes"),
                   help="log-scale x axis (default: $REPORT_LOGX=1)")
    p = add("sample", cmd_sample, "generate text from a run's checkpoint")
    p.add_argument("--run", default=os.environ.get("RUN_DIR", ""),
                   help="run directory (default: $RUN_DIR, else the newest run with a checkpoint)")
    p.add_argument("--prompt", default=os.environ.get("PROMPT"), help="default: $PROMPT, else the run's SAMPLE_PROMPT")
    p.add_argument("--tokens", type=int, default=os.environ.get("TOKENS"),
                   help="default: $TOKENS, else the run's SAMPLE_TOKENS")
    p.add_argument("--top-p", type=float, default=os.environ.get("TOP_P"),
                   help="default: $TOP_P, else the run's SAMPLE_TOP_P (1 = off)")
    p.add_argument("--stop", default=os.environ.get("STOP"),
                   help="default: $STOP, else the run's SAMPLE_STOP ('|'-separated, \\n for a newline)")
    p = add("export", cmd_export, "write a run's checkpoint as a Hugging Face folder, <run>/export/hf/")
    p.add_argument("--run", default=os.environ.get("RUN_DIR", ""),
                   help="run directory (default: $RUN_DIR, else the newest run with a checkpoint)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default=os.environ.get("CHECKPOINT") or "best",
                   help="best (lowest val loss, the default) or latest step checkpoint (default: $CHECKPOINT)")
    p = add("eval", cmd_eval, "evaluate runs: EVAL_TASKS through lm-eval, bits per byte, generation quality")
    p.add_argument("--run", default=os.environ.get("RUN_DIR", ""),
                   help="one run directory (default: $RUN_DIR, else every finished run of the plan)")
    p.add_argument("--plan", default=os.environ.get("PLAN", ""), help="plan directory (default: $PLAN, else the newest)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default=os.environ.get("CHECKPOINT") or "best",
                   help="best (lowest val loss, the default) or latest step checkpoint (default: $CHECKPOINT)")
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (NamedError, NotImplementedError) as e:  # DataError, CheckpointError, MetricsError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("KBUILD_DEBUG"):
            raise
        print(f"error: {e} (KBUILD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
