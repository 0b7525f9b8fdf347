"""The configuration contract: strict loading, named errors, typed config.py, round trips."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import kconfiglib
import pytest

from kbuild.kconfig import (ROOT, Assignment, ConfigError, config_py_text, float_spec, parse_file,
                            parse_overrides, resolve, values, write_min_config, write_outputs)

DEFCONFIGS = sorted(p for p in (ROOT / "defconfigs").iterdir() if p.is_file())


def errors_for(tmp_path, text: str) -> list[str]:
    f = tmp_path / "bad_defconfig"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve(parse_file(f))
    return e.value.problems


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_every_shipped_defconfig_loads_strictly(path):
    kconf, problems = resolve(parse_file(path))
    assert problems == []
    cfg = values(kconf)
    assert cfg.PLAN_NAME == path.name, "each preset names its plan after itself"


@pytest.mark.parametrize("text, line, symbol, reason", [
    ('CONFIG_NO_SUCH_OPTION=y\n', 1, "NO_SUCH_OPTION", "unknown symbol"),
    ('# x\nCONFIG_N_LAYRE=3\n', 2, "N_LAYRE", "did you mean N_LAYER"),
    ('CONFIG_MAX_ITERS=ten\n', 1, "MAX_ITERS", "malformed integer 'ten'"),
    ('CONFIG_BIAS=maybe\n', 1, "BIAS", "malformed bool"),
    ('CONFIG_RUNS_DIR=out\n', 1, "RUNS_DIR", "malformed string"),
    ('CONFIG_MAX_ITERS=0\n', 1, "MAX_ITERS", "out of range: must be within [1, 1000000000]"),
    ('CONFIG_N_LAYER=3\n', 1, "N_LAYER", "unmet dependency MODEL_SIZE_CUSTOM"),
    ('CONFIG_ROPE_THETA="500000"\n', 1, "ROPE_THETA", "unmet dependency POS_ROPE"),
    ('CONFIG_LR="3e-4x"\n', 1, "LR", "not a number"),
    ('CONFIG_DROPOUT="1.5"\n', 1, "DROPOUT", "out of range: must be within [0, 1]"),
    ('CONFIG_NORM_RMSNORM=y\nCONFIG_NORM_LAYERNORM=y\n', 1, "NORM_RMSNORM", "choice conflict"),
    ('CONFIG_SEED=1\nCONFIG_SEED=2\n', 2, "SEED", "assigned twice"),
    ('CONFIG_N_KV_HEAD=8\n', 1, "N_KV_HEAD", "out of range: must be within [0, 4]"),
])
def test_assignment_that_does_not_take_is_a_named_error(tmp_path, text, line, symbol, reason):
    problems = errors_for(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'bad_defconfig'}:{line}: CONFIG_{symbol}")
    assert reason in problems[0]


def test_malformed_line_is_named(tmp_path):
    problems = errors_for(tmp_path, "CONFIG_SEED=1\nSEED 2\n")
    assert problems == [f"{tmp_path / 'bad_defconfig'}:2: malformed line 'SEED 2': expected CONFIG_NAME=value, "
                        "'# CONFIG_NAME is not set', a comment or a blank line"]


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    assert len(errors_for(tmp_path, "CONFIG_A=1\nCONFIG_SEED=x\nCONFIG_MAX_ITERS=0\n")) == 3


def test_overrides_accept_prefix_quotes_and_bare_strings():
    kconf, _ = resolve([], parse_overrides('CONFIG_SEED=7 MAX_ITERS=12 RUNS_DIR=out DATA_PATH="/a b/c.txt" LR=3e-4'))
    cfg = values(kconf)
    assert (cfg.SEED, cfg.MAX_ITERS, cfg.RUNS_DIR, cfg.DATA_PATH, cfg.LR) == (7, 12, "out", "/a b/c.txt", 3e-4)


def test_bad_override_names_the_set_item():
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides("SEED=1 MAX_ITERS=-5"))
    assert e.value.problems[0].startswith("SET:2: CONFIG_MAX_ITERS=-5: out of range")
    with pytest.raises(ConfigError, match="SET item 1: 'SEED' is not NAME=value"):
        parse_overrides("SEED")


def test_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "d"
    f.write_text("CONFIG_SEED=1\n")
    kconf, _ = resolve(parse_file(f), parse_overrides("SEED=2"))
    assert values(kconf).SEED == 2


def test_config_py_round_trips_every_type(tmp_path):
    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / "quickstart"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    loaded = {k: v for k, v in runpy.run_path(str(tmp_path / "config.py")).items() if k.isupper()}
    cfg = values(kconf)
    assert loaded == dict(cfg)
    assert all(type(loaded[k]) is type(cfg[k]) for k in cfg)
    types = {type(v) for v in loaded.values()}
    assert {bool, int, float, str, type(None)} <= types
    assert loaded["LR"] == 2e-3 and loaded["SAMPLE_PROMPT"] == "def " and loaded["RUN_MATRIX"] is False
    assert loaded["WSD_DECAY_FRACTION"] is None  # its dependency (LR_WSD) is off
    assert set(loaded) == {s.name for s in kconf.unique_defined_syms}


def test_config_py_quotes_strings_with_repr():
    kconf, _ = resolve([], parse_overrides('DATA_PATH="it\'s \\"q\\" \\\\ x"'))
    text = config_py_text(kconf)
    ns: dict = {}  # repr output must be valid Python that reproduces the value
    exec(text, ns)
    assert ns["DATA_PATH"] == values(kconf).DATA_PATH == 'it\'s "q" \\ x'


def test_outputs_written_atomically_and_only_when_changed(tmp_path):
    kconf, _ = resolve([])
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    os.utime(tmp_path / "config.py", ns=(1, 1))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    assert (tmp_path / "config.py").stat().st_mtime_ns == 1, "unchanged content must not be rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before), "no temporary files left behind"


def test_full_config_reloads_strictly_to_the_same_values(tmp_path):
    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / "nanogpt-shakespeare-char"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    again, problems = resolve(parse_file(tmp_path / ".config"))
    assert problems == [] and values(again) == values(kconf)


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_savedefconfig_round_trips(tmp_path, path):
    kconf, _ = resolve(parse_file(path))
    write_min_config(kconf, tmp_path / "min")
    again, _ = resolve(parse_file(tmp_path / "min"))
    assert values(again) == values(kconf)
    assert len(parse_file(tmp_path / "min")) <= len(parse_file(path))


def test_lenient_resolution_reports_but_keeps_going(tmp_path):
    f = tmp_path / ".config"
    f.write_text("CONFIG_REMOVED_OPTION=y\nCONFIG_SEED=5\n")
    kconf, problems = resolve(parse_file(f), lenient=True)
    assert values(kconf).SEED == 5
    assert len(problems) == 1 and "CONFIG_REMOVED_OPTION: unknown symbol" in problems[0]


def test_every_visible_symbol_has_help_and_float_defaults_parse():
    kconf, _ = resolve([])
    for sym in kconf.unique_defined_syms + kconf.unique_choices:
        for node in sym.nodes:
            if node.prompt:
                assert node.help, f"{node.filename}:{node.linenr}: {sym.name or 'choice'} has no help text"
    for sym in kconf.unique_defined_syms:
        spec = float_spec(sym)
        if spec and sym.str_value and not spec.is_list:
            assert spec.lo <= float(sym.str_value) <= spec.hi, sym.name


def test_contract_symbols_exist_with_their_types():
    kconf, _ = resolve([])
    expected = {"MAX_ITERS": kconfiglib.INT, "MAX_TIME": kconfiglib.INT, "SEED": kconfiglib.INT,
                "EVAL_INTERVAL": kconfiglib.INT, "DATA_PATH": kconfiglib.STRING, "RUNS_DIR": kconfiglib.STRING}
    for name, typ in expected.items():
        assert kconf.syms[name].orig_type == typ
    cfg = values(kconf)
    assert cfg.RUNS_DIR == "runs" and cfg.MAX_TIME == 0 and cfg.DATA_PATH == ""


def test_assignment_where():
    assert Assignment("SEED", "1", "defconfigs/x", 4).where == "defconfigs/x:4"


def test_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        parse_file(Path(tmp_path / "missing"))
