"""The kernel's configuration targets: defconfig, setconfig, diffconfig, KCONFIG_CONFIG, oldconfig,
listnewconfig, alldefconfig, guiconfig's refusal, and the variables 'make help' lists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_make

from kconfig.diff import diff_files, diff_lines
from kconfig.tree import END_MARKER, resolve, write_outputs


def test_help_lists_the_configuration_targets_and_the_variables(make):
    out = make("help").stdout
    for target in ("defconfig ", "nconfig", "guiconfig", "oldconfig", "listnewconfig", "alldefconfig",
                   "setconfig", "diffconfig"):
        assert f"  {target}" in out, target
    variables = out[out.index("Variables"):]
    for name in ("SET=", "PLAN=", "RUN_DIR=", "PROMPT=", "TOKENS=", "TOP_P=", "STOP=<a|b>", "CHECKPOINT=best|latest",
                 "VENV=", "TORCH_SPEC=", "SKIP_SETUP=1", "PYTEST_ARGS=", "KCONFIG_CONFIG=", "A=<x> B=<y>"):
        assert f"\n  {name}" in variables, name
    assert "make SET='SAMPLE_PROMPT=$HOME' gives the text $HOME" in out
    assert "(RUN_DIR=, CHECKPOINT=best|latest)" in out, "a '|' in a help line is shown whole"


def test_savedefconfig_then_defconfig_gives_the_same_config(repo, make):
    make("defconfig-quickstart", "SET=SEED=5 MLP_SWIGLU=y")
    full, typed = (repo / ".config").read_bytes(), (repo / "config.py").read_bytes()
    make("savedefconfig")
    assert "CONFIG_SEED=5" in (repo / "defconfig").read_text()
    (repo / ".config").unlink()
    (repo / "config.py").unlink()
    assert "configured from defconfig" in make("defconfig").stdout
    assert (repo / ".config").read_bytes() == full and (repo / "config.py").read_bytes() == typed


def test_an_all_default_configuration_round_trips_too(repo, make):
    make("alldefconfig")
    full = (repo / ".config").read_bytes()
    make("savedefconfig")
    assert (repo / "defconfig").read_text() == ""
    (repo / ".config").unlink()
    make("defconfig")
    assert (repo / ".config").read_bytes() == full


def test_defconfig_without_a_saved_one_says_what_to_do(repo, make):
    p = make("defconfig", check=False)
    assert p.returncode == 2 and "./defconfig: no such file; 'make savedefconfig' writes ./defconfig" in p.stderr
    (repo / "defconfig").write_text("CONFIG_LR=\"fast\"\n")
    p = make("defconfig", check=False)
    assert p.returncode == 2 and 'defconfig:1: CONFIG_LR="fast": not a number' in p.stderr
    assert not (repo / ".config").exists()


def test_setconfig_writes_keeps_the_old_config_and_regenerates_config_py(repo, make):
    make("defconfig-quickstart")
    before = (repo / ".config").read_text()
    out = make("setconfig", "SET=LR=1e-3 CONFIG_MAX_ITERS=200 MLP_GEGLU=y").stdout
    assert out.splitlines() == [' LR "2e-3" -> "1e-3"', " MAX_ITERS 600 -> 200", " MLP_GEGLU n -> y",
                                " MLP_SWIGLU y -> n",
                                "wrote .config (the previous one is .config.old) and config.py"]
    assert (repo / ".config.old").read_text() == before
    dot = (repo / ".config").read_text()
    assert 'CONFIG_LR="1e-3"' in dot and dot.endswith(f"{END_MARKER}\n")
    typed = (repo / "config.py").read_text()
    assert "LR: float = 0.001" in typed and "MAX_ITERS: int = 200" in typed
    assert make("diffconfig").stdout == out[:out.index("wrote")], "diffconfig defaults to .config.old -> .config"
    assert make("setconfig", "SET=LR=1e-3").stdout.startswith("no change: .config already holds")
    assert (repo / ".config.old").read_text() == before, "an edit that changes nothing keeps .config.old"


@pytest.mark.parametrize("edit, error", [
    ("LR=fast", 'SET:1: CONFIG_LR="fast": not a number; write a float such as 3e-4'),
    ("N_LAYERS=3", "SET:1: CONFIG_N_LAYERS: unknown symbol: no Kconfig file defines it (did you mean N_LAYER"),
    ("N_LAYER=3", "SET:1: CONFIG_N_LAYER=3: did not take: unmet dependency MODEL_SIZE_CUSTOM"),
    ("MIN_LR=1e-1", "CONFIG_MIN_LR"),
    ("", "setconfig: SET is empty: name the values to write"),
])
def test_setconfig_refuses_and_writes_nothing(repo, make, edit, error):
    make("defconfig-quickstart")
    dot, typed = (repo / ".config").read_bytes(), (repo / "config.py").read_bytes()
    p = make("setconfig", f"SET={edit}", check=False)
    assert p.returncode == 2 and error in p.stderr, p.stderr
    assert (repo / ".config").read_bytes() == dot and (repo / "config.py").read_bytes() == typed
    assert not (repo / ".config.old").exists()


def test_diffconfig_prints_the_kernels_form(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text('# a comment\nCONFIG_LR="3e-4"\nCONFIG_N_LAYER=4\n# CONFIG_BIAS is not set\nCONFIG_GONE=y\n'
                 'CONFIG_SAME="x y"\n')
    b.write_text('CONFIG_SAME="x y"\nCONFIG_NEW=7\nCONFIG_BIAS=y\nCONFIG_N_LAYER=6\nCONFIG_LR="1e-3"\n'
                 '# CONFIG_ADDED_OFF is not set\n')
    assert diff_files(a, b) == ["-GONE y", " BIAS n -> y", ' LR "3e-4" -> "1e-3"', " N_LAYER 4 -> 6",
                                "+ADDED_OFF n", "+NEW 7"]
    assert diff_files(a, a) == []
    assert diff_lines({"X": "1"}, {}) == ["-X 1"]


def _run_dir(path, kconf):
    path.mkdir(parents=True)
    write_outputs(kconf, path / ".config", path / "config.py")
    return path


def test_diffconfig_reads_run_and_plan_directories(tmp_path, capsys, config):
    from kbuild.__main__ import main
    from kconfig.tree import parse_overrides

    plan = tmp_path / "plan-a"
    _run_dir(plan / "base", resolve(parse_overrides("SEED=3"))[0])
    _run_dir(plan / "lion", resolve(parse_overrides("SEED=3 OPT_LION=y"))[0])
    (plan / "plan.json").write_text(json.dumps({"runs": [{"name": "base", "baseline": True},
                                                          {"name": "lion", "baseline": False}]}))
    other = _run_dir(tmp_path / "other-run", resolve(parse_overrides("SEED=4"))[0])
    assert main(["diffconfig", str(plan), str(other)]) == 0
    assert capsys.readouterr().out == " SEED 3 -> 4\n"
    assert main(["diffconfig", str(plan / "base"), str(plan / "lion" / ".config")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " OPT_ADAMW y -> n" in lines and " OPT_LION n -> y" in lines
    (plan / "plan.json").write_text(json.dumps({"runs": [{"name": "lion", "baseline": False}]}))
    assert main(["diffconfig", str(plan), str(other)]) == 2
    assert "the plan has no baseline run with a .config to compare; name one of its runs instead (lion)" in \
        capsys.readouterr().err


def test_kconfig_config_names_the_file_every_target_uses(repo, make):
    make("defconfig-quickstart")
    dot, typed = (repo / ".config").read_bytes(), (repo / "config.py").read_bytes()
    other = "configs/moe.config"
    (repo / "configs").mkdir()
    assert "wrote configs/moe.config and configs/moe.config.py" in make("defconfig-moe-tiny",
                                                                        f"KCONFIG_CONFIG={other}").stdout
    make("setconfig", "SET=SEED=5", env={"KCONFIG_CONFIG": other})
    assert (repo / f"{other}.old").is_file() and "SEED: int = 5" in (repo / f"{other}.py").read_text()
    make("savedefconfig", f"KCONFIG_CONFIG={other}")
    saved = (repo / "defconfig").read_text()
    assert "CONFIG_MOE=y" in saved and "CONFIG_SEED=5" in saved
    make("olddefconfig", f"KCONFIG_CONFIG={other}")
    assert "+" not in make("diffconfig", f"KCONFIG_CONFIG={other}").stdout
    assert " MOE n -> y" in make("diffconfig", "A=.config", f"B={other}").stdout
    p = make("run", "KCONFIG_CONFIG=missing.config", check=False)
    assert p.returncode == 2 and "missing.config: no configuration yet" in p.stderr, "make (run) reads it too"
    assert (repo / ".config").read_bytes() == dot and (repo / "config.py").read_bytes() == typed


def _make_with_input(repo, target, text):
    cmd = ["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}", target]
    return subprocess.run(cmd, cwd=repo, input=text, capture_output=True, text=True, timeout=60)


def test_oldconfig_asks_only_the_new_symbols_and_listnewconfig_lists_them(repo, make):
    make("defconfig-quickstart")
    dot = repo / ".config"
    dot.write_text("".join(line for line in dot.read_text().splitlines(keepends=True)
                           if not line.startswith("CONFIG_SEED=")))  # as if SEED were new in the tree
    assert make("listnewconfig").stdout == "CONFIG_SEED=1337\n"
    p = _make_with_input(repo, "oldconfig", "7\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("(SEED, defined at") == 1 and p.stdout.count("defined at") == 1, p.stdout
    assert "validated .config and regenerated config.py" in p.stdout
    assert "CONFIG_SEED=7" in dot.read_text() and dot.read_text().endswith(f"{END_MARKER}\n")
    assert "SEED: int = 7" in (repo / "config.py").read_text()
    assert make("listnewconfig").stdout == ""


def test_oldconfig_without_answers_writes_nothing_and_says_why(repo, make):
    make("defconfig-quickstart")
    dot = repo / ".config"
    dot.write_text("".join(line for line in dot.read_text().splitlines(keepends=True)
                           if not line.startswith("CONFIG_SEED=")))
    before = dot.read_bytes()
    p = _make_with_input(repo, "oldconfig", "")
    assert p.returncode == 2 and "oldconfig: the input ended before every new symbol had an answer; nothing " \
        "was written to .config" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert dot.read_bytes() == before and not (repo / ".config.old").exists()


def test_oldconfig_result_is_checked_strictly(repo, make):
    make("defconfig-quickstart")
    dot = repo / ".config"
    dot.write_text("".join(line for line in dot.read_text().splitlines(keepends=True)
                           if not line.startswith("CONFIG_MIN_LR=")))
    p = _make_with_input(repo, "oldconfig", "fast\n")  # a float is free text to kconfiglib
    assert p.returncode == 2 and 'CONFIG_MIN_LR="fast": not a number' in p.stderr, p.stderr
    assert "fix the values above with 'make menuconfig'" in p.stdout


def test_alldefconfig_writes_the_defaults_validated(repo, make):
    make("defconfig-quickstart")
    assert "validated .config and regenerated config.py" in make("alldefconfig").stdout
    kconf, _ = resolve()
    write_outputs(kconf, repo / "defaults.config", repo / "defaults.py")
    assert (repo / ".config").read_text() == (repo / "defaults.config").read_text()
    assert (repo / "config.py").read_text() == (repo / "defaults.py").read_text()


def test_guiconfig_without_tkinter_says_so(repo, tmp_path):
    shadow = tmp_path / "no-tk"
    shadow.mkdir()
    (shadow / "tkinter.py").write_text('raise ImportError("No module named \'_tkinter\'")\n')
    p = run_make(repo, "guiconfig", check=False, env={"PYTHONPATH": str(shadow)})
    assert p.returncode == 2 and "make guiconfig needs tkinter" in p.stderr and "make menuconfig" in p.stderr
    assert not (repo / ".config").exists()


@pytest.mark.slow
def test_check_dry_runs_the_configuration_kconfig_config_names(repo, make):
    make("defconfig-quickstart", "SET=MAX_ITERS=20 WARMUP_ITERS=2")
    (repo / ".config").rename(repo / "quick.config")
    (repo / ".config").write_text('CONFIG_LR="fast"\n')  # the default file is not read
    p = make("check", "KCONFIG_CONFIG=quick.config", timeout=300)
    assert "check passed" in p.stdout, p.stdout
    assert (repo / ".config").read_text() == 'CONFIG_LR="fast"\n'


def _menuconfig_save_and_quit(repo, *args: str) -> int:
    """Run 'make menuconfig' on a pseudo-terminal, press Q, answer y to 'Save configuration?'."""
    keys = [(b"Toggle/enter", b"Q"), (b"Save configuration?", b"y")]  # the key bar at the bottom of the menu
    return _menuconfig_session(repo, keys, *args)[0]


def test_menuconfig_edits_the_file_kconfig_config_names(repo, make):
    make("defconfig-quickstart")
    dot = (repo / ".config").read_bytes()
    make("defconfig-moe-tiny", "KCONFIG_CONFIG=moe.config")
    (repo / "moe.config.py").unlink()
    assert _menuconfig_save_and_quit(repo, "KCONFIG_CONFIG=moe.config") == 0
    assert (repo / "moe.config").read_text().endswith(f"{END_MARKER}\n"), "syncconfig validated and rewrote it"
    assert "MOE: bool = True" in (repo / "moe.config.py").read_text()
    assert (repo / ".config").read_bytes() == dot


def test_a_failing_menu_save_is_set_aside_and_the_previous_configuration_kept(repo, make):
    """What a menu leaves when a value fails the strict check (LR typed as 'fast'): the edit goes to
    .config.rejected and the configuration from before it (.config.old, which the menus write) comes back."""
    import subprocess

    make("defconfig-quickstart")
    good = (repo / ".config").read_text()
    (repo / ".config.old").write_text(good)
    (repo / ".config").write_text(good.replace('CONFIG_LR="2e-3"', 'CONFIG_LR="fast"'))
    config_py = (repo / "config.py").read_bytes()
    p = subprocess.run([sys.executable, "-m", "kbuild", "syncconfig", "--after-edit"], cwd=repo,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "CONFIG_LR" in p.stderr and "fast" in p.stderr
    assert "the edit was not kept: it is in .config.rejected" in p.stderr
    assert (repo / ".config").read_text() == good and (repo / "config.py").read_bytes() == config_py
    assert 'CONFIG_LR="fast"' in (repo / ".config.rejected").read_text()


def _menuconfig_session(repo, keys: list[tuple[bytes, bytes]], *args: str) -> tuple[int, bytes]:
    """'make menuconfig [args]' on a pseudo-terminal: for each (wait_for, send), wait until the screen shows
    ``wait_for`` (b"" = send at once) and type ``send``; returns (exit code, everything shown)."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(repo)
        os.environ.update(TERM="xterm", LINES="40", COLUMNS="120")
        os.execvp("make", ["make", "--no-print-directory", "SKIP_SETUP=1", f"PYTHON={sys.executable}", "menuconfig",
                           *args])
    out = b""

    def read_until(done, limit=30.0):
        nonlocal out
        end = time.monotonic() + limit
        while time.monotonic() < end and not done():
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    return

    for wait_for, send in keys:
        seen = len(out)
        read_until(lambda: wait_for in out[seen:] if wait_for else True, limit=30.0)
        time.sleep(0.3)
        os.write(fd, send)
    read_until(lambda: False, limit=15.0)
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


@pytest.mark.slow
def test_menuconfig_refuses_a_bad_float_typed_into_the_menu(repo, make):
    """Typed into the real menu on a pseudo-terminal: LR set to 'fast' and saved. The check names CONFIG_LR,
    the edit goes to .config.rejected and .config stays the configuration from before the edit."""
    make("defconfig-quickstart")
    good = (repo / ".config").read_text()
    keys = [(b"Toggle/enter", b"/"), (b"", b"^LR$"), (b"", b"\n"), (b"", b"\n"),  # jump to LR, edit it
            (b"", b"\x7f" * 12 + b"fast\n"), (b"", b"Q"), (b"Save configuration?", b"y")]
    code, out = _menuconfig_session(repo, keys)
    assert code == 2
    assert b'CONFIG_LR="fast": not a number' in out and b"the edit was not kept" in out
    assert (repo / ".config").read_text() == good
    assert 'CONFIG_LR="fast"' in (repo / ".config.rejected").read_text()


@pytest.mark.slow
def test_menuconfigs_help_screen_says_a_floats_type_and_range(repo, make):
    """'?' on LR in the real menu: the help screen says what the value must be, not only "Type: string"."""
    make("defconfig-quickstart")
    keys = [(b"Toggle/enter", b"/"), (b"", b"^LR$"), (b"", b"\n"), (b"", b"?"),  # jump to LR, its help
            (b"Type: float within [0, 10]", b"\x1b"), (b"", b"Q")]
    code, out = _menuconfig_session(repo, keys)
    assert code == 0 and b"Type: float within [0, 10]" in out
