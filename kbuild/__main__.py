"""Command line behind the Makefile: python -m kbuild <command> (see 'make help')."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kbuild.kconfig import (ROOT, ConfigError, load, parse_file, parse_overrides, resolve, values,
                            write_min_config, write_outputs)

from data.corpus import DataError

DOT_CONFIG = ROOT / ".config"
CONFIG_PY = ROOT / "config.py"
DEFCONFIGS = ROOT / "defconfigs"


def defconfig_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
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
    kconf, _ = resolve(parse_file(path), parse_overrides(args.set))
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print(f"configured from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: wrote .config and config.py")
    return 0


def cmd_olddefconfig(args) -> int:
    kconf, problems = resolve(parse_file(DOT_CONFIG, snapshot=True) if DOT_CONFIG.exists() else [], parse_overrides(args.set),
                              lenient=True)
    for p in problems:
        print(f"warning: dropped: {p}", file=sys.stderr)
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print("updated .config and config.py to the current Kconfig tree")
    return 0


def cmd_syncconfig(args) -> int:
    """After menuconfig: validate .config strictly (float fields are free text there) and regenerate config.py."""
    kconf, _ = load(DOT_CONFIG)
    write_outputs(kconf, DOT_CONFIG, CONFIG_PY)
    print("validated .config and regenerated config.py")
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
    return 0


def overrides_of(cfg, text: str) -> dict:
    return {a.symbol: cfg[a.symbol] for a in parse_overrides(text)}


def cmd_run(args) -> int:
    kconf, cfg = load(DOT_CONFIG, args.set)
    if cfg.DRY_RUN:
        return cmd_check(args)
    from plan.runner import execute

    plan = execute(kconf, cfg, overrides_of(cfg, args.set))
    return 0 if all(r["status"] == "done" for r in plan.runs) else 1


def cmd_check(args) -> int:
    from plan.check import check_config
    from plan.runner import plan_runs

    _, cfg = load(DOT_CONFIG, args.set)
    failures = 0
    for run in plan_runs(cfg, overrides_of(cfg, args.set)):
        try:
            r = check_config(cfg)
            how = "reduced twin (full model exceeds the CPU budget)" if r["twin"] else "full size"
            print(f"check {run['name']}: ok: {r['params']:,} params, built at {how}, "
                  f"2 steps, losses {r['losses'][0]:.3f} -> {r['losses'][1]:.3f}, every parameter got a gradient")
        except Exception as e:
            failures += 1
            print(f"check {run['name']}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failures else 0


def cmd_sample(args) -> int:
    from plan.runner import runs_dir
    from plan.plan import newest_run_dir
    from train.sample import sample_from

    _, cfg = load(DOT_CONFIG) if DOT_CONFIG.exists() else (None, None)
    run_dir = Path(args.run) if args.run else newest_run_dir(runs_dir(cfg) if cfg else ROOT / "runs")
    if run_dir is None:
        print("error: no run with a checkpoint yet; train one with 'make' first", file=sys.stderr)
        return 1
    print(sample_from(run_dir, args.prompt, args.tokens))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kbuild", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--set", default=os.environ.get("SET", ""),
                       help='one-shot overrides: "NAME=value NAME2=value" (default: $SET, as make passes it)')
        p.set_defaults(fn=fn)
        return p

    add("defconfig", cmd_defconfig, "load a defconfig strictly").add_argument("name")
    add("olddefconfig", cmd_olddefconfig, "update .config to the current Kconfig tree")
    add("syncconfig", cmd_syncconfig, "validate .config strictly and regenerate config.py")
    add("savedefconfig", cmd_savedefconfig, "write a minimal defconfig").add_argument("--out", default="defconfig")
    add("list-defconfigs", cmd_list_defconfigs, "list presets")
    add("run", cmd_run, "run the configured plan")
    add("check", cmd_check, "CPU dry run of every planned run")
    p = add("sample", cmd_sample, "generate text from a run's checkpoint")
    p.add_argument("--run", default=os.environ.get("RUN_DIR", ""),
                   help="run directory (default: $RUN_DIR, else the newest run with a checkpoint)")
    p.add_argument("--prompt", default=os.environ.get("PROMPT"), help="default: $PROMPT, else the run's SAMPLE_PROMPT")
    p.add_argument("--tokens", type=int, default=os.environ.get("TOKENS"),
                   help="default: $TOKENS, else the run's SAMPLE_TOKENS")
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (DataError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("KBUILD_DEBUG"):
            raise
        print(f"error: {e} (KBUILD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
