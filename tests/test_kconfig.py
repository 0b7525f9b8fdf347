"""The configuration contract: strict loading, named errors, typed config.py, round trips."""

from __future__ import annotations

import os
import runpy
import shlex
from pathlib import Path

import kconfiglib
import pytest
from conftest import config_of

from kconfig.errors import ConfigError

from kconfig.tree import (ROOT, Assignment, load, parse_file, parse_overrides, resolve, write_min_config, write_outputs)

from kconfig.values import config_py_text, float_spec, values

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
    kconf, _ = resolve([], parse_overrides('CONFIG_SEED=7 MAX_ITERS=120 RUNS_DIR=out DATA_PATH="/a b/c.txt" LR=3e-4'))
    cfg = values(kconf)
    assert (cfg.SEED, cfg.MAX_ITERS, cfg.RUNS_DIR, cfg.DATA_PATH, cfg.LR) == (7, 120, "out", "/a b/c.txt", 3e-4)


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
    assert set(loaded) == {s.name for s in kconf.unique_defined_syms} | {c.name for c in kconf.unique_choices}
    assert loaded["MLP"] == "swiglu" and loaded["OPTIMIZER"] == "adamw" and loaded["MUON_IMPL"] is None


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


# --------------------------------------------------------------------------- bad input, named


@pytest.mark.parametrize("text, what", [
    ('SAMPLE_PROMPT="a\nb"', "a newline character (U+000A)"),
    ('SLURM_EXTRA="--qos=high\ntouch /tmp/x"', "a newline character (U+000A)"),
    ("DATA_PATH='a\tb'", "a tab character (U+0009)"),
    ('SAMPLE_PROMPT="a\rb"', "a carriage return character (U+000D)"),
    ('SAMPLE_PROMPT="a\u2028b"', "a line separator character (U+2028)"),
    ('SAMPLE_PROMPT="a\x1bb"', "a control character (U+001B)"),
])
def test_control_characters_in_strings_are_refused_naming_the_symbol(text, what):
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides(text))
    [problem] = e.value.problems
    assert problem.startswith(f"SET:1: CONFIG_{text.split('=')[0]}: the value contains {what}")
    assert "one line of printable text" in problem


def test_control_character_in_a_file_value_is_refused(tmp_path):
    assert errors_for(tmp_path, 'CONFIG_PLAN_NAME="x"\nCONFIG_SAMPLE_PROMPT="a\tb"\n') == [
        f"{tmp_path / 'bad_defconfig'}:2: CONFIG_SAMPLE_PROMPT: the value contains a tab character (U+0009) at "
        "position 2; a string value is one line of printable text (no newline, tab or other control character)"]


def test_control_character_in_a_default_is_found_after_resolving():
    from kconfig.tree import _check_strings

    kconf, _ = resolve([])
    kconf.syms["SAMPLE_PROMPT"].set_value("a\nb")  # as a Kconfig default would give it
    [problem] = _check_strings(kconf, {})
    assert problem.startswith("train/Kconfig:") and "(default): CONFIG_SAMPLE_PROMPT: the value contains a newline" in problem


def test_written_config_round_trips_printable_strings(tmp_path):
    prompt = 'it\'s "q" \\ $HOME $(x) `y` € ✓'
    kconf, _ = resolve([], parse_overrides(f"SAMPLE_PROMPT={shlex.quote(prompt)}"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    assert values(load(tmp_path / ".config")[0]).SAMPLE_PROMPT == prompt


@pytest.mark.parametrize("value, canonical", [(" 30", "30"), ("1_000", "1000"), ("+30", "30"), ("030", "30"),
                                              ("-0", "0"), ("٣٠", "30")])
def test_non_canonical_int_in_a_file_is_refused_with_its_canonical_form(tmp_path, value, canonical):
    [problem] = errors_for(tmp_path, f"CONFIG_SEED={value}\n")
    assert problem == (f"{tmp_path / 'bad_defconfig'}:1: CONFIG_SEED: non-canonical integer {value!r}: "
                       f"write CONFIG_SEED={canonical}")


def test_set_normalizes_ints_and_the_written_config_is_canonical(tmp_path):
    kconf, _ = resolve([], parse_overrides("SEED=+030 MAX_ITERS=1_000"))
    assert (values(kconf).SEED, values(kconf).MAX_ITERS) == (30, 1000)
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    text = (tmp_path / ".config").read_text()
    assert "CONFIG_SEED=30\n" in text and "CONFIG_MAX_ITERS=1000\n" in text
    with pytest.raises(ConfigError, match="SET:1: CONFIG_SEED: non-canonical integer '٣٠': write CONFIG_SEED=30"):
        resolve([], parse_overrides("SEED=٣٠"))  # only ASCII digits are normalized


@pytest.mark.parametrize("data, line, offset, what", [
    (b"CONFIG_SEED=1\n\xff\xfe\n", 2, 14, "not UTF-8 text: byte 0xff at offset 14"),
    (b"# caf\xc3\xa9\nCONFIG_PLAN_NAME=\"\xe9t\xe9\"\n", 2, 26, "not UTF-8 text: byte 0xe9 at offset 26"),
    (b"CONFIG_SEED=1\nCONFIG_MAX\x00_ITERS=3\n", 2, 24, "binary data: a NUL byte at offset 24"),
])
def test_binary_or_non_utf8_file_names_file_line_and_byte(tmp_path, data, line, offset, what):
    f = tmp_path / "bad_defconfig"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        parse_file(f)
    [problem] = e.value.problems
    assert problem.startswith(f"{f}:{line}: {what}")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a description\n", "# CONFIG_ stuff\n   \n"])
def test_defconfig_that_sets_nothing_is_a_named_error(tmp_path, text):
    [problem] = errors_for(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'bad_defconfig'}: assigns nothing (no CONFIG_ line)")


def test_written_config_ends_with_the_marker_and_a_cut_one_is_refused(tmp_path):
    from kconfig.tree import END_MARKER

    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / "quickstart"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    text = (tmp_path / ".config").read_text()
    assert text.endswith(f"\n{END_MARKER}\n")
    assert load(tmp_path / ".config")[1] == values(kconf)
    cut = tmp_path / "cut.config"
    for end in (text.rindex(END_MARKER), len(text) // 2, text.index("CONFIG_VAL_FRACTION") + 22):
        cut.write_text(text[:end])
        with pytest.raises(ConfigError) as e:
            load(cut)
        assert e.value.problems[-1].startswith(f"{cut} is truncated") or "malformed" in e.value.problems[0]
        assert "make olddefconfig" in e.value.problems[-1]
    cut.write_text(text[:text.rindex(END_MARKER)])
    with pytest.raises(ConfigError, match="is truncated: kbuild wrote it, but its final line"):
        load(cut)


def test_empty_config_is_refused_on_load(tmp_path):
    (tmp_path / ".config").write_text("")
    with pytest.raises(ConfigError) as e:
        load(tmp_path / ".config")
    [problem] = e.value.problems
    assert problem.startswith(
        f"{tmp_path / '.config'} is truncated or was not written by kbuild: it lacks the final line "
        f"'# end of configuration (kbuild)' and does not record CONFIG_RUN_SINGLE, CONFIG_RUN_ABLATION, "
        f"CONFIG_RUN_MATRIX and ")
    assert problem.endswith(" more; run 'make olddefconfig' to keep its values and give the rest their defaults, "
                            "or 'make defconfig-<name>' to start over")


def test_menuconfig_written_config_is_accepted_but_an_incomplete_one_is_not(tmp_path):
    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / "quickstart"))
    kconf.write_config(str(tmp_path / ".config"), save_old=False)  # what menuconfig writes: no kbuild marker
    assert load(tmp_path / ".config")[1] == values(kconf)
    lines = (tmp_path / ".config").read_text().splitlines()
    (tmp_path / ".config").write_text("\n".join(line for line in lines if "CONFIG_MAX_ITERS" not in line) + "\n")
    with pytest.raises(ConfigError, match="was not written by kbuild: .* does not record CONFIG_MAX_ITERS;"):
        load(tmp_path / ".config")


@pytest.mark.parametrize("text, reason", [
    ("POS_ROPE=y ROPE_THETA=inf", 'CONFIG_ROPE_THETA="inf": not a finite number'),
    ("POS_ROPE=y ROPE_THETA=0", 'CONFIG_ROPE_THETA="0": out of range: must be within [2, 1e+12]'),
    ("POS_ROPE=y ROPE_THETA=-1e4", 'CONFIG_ROPE_THETA="-1e4": out of range'),
    ("LR=nan", 'CONFIG_LR="nan": not a finite number'),
    ("GRAD_CLIP=-inf", 'CONFIG_GRAD_CLIP="-inf": not a finite number'),
    ("LR=1_0", 'CONFIG_LR="1_0": not a number'),
    ('LR=" 3e-4"', 'CONFIG_LR=" 3e-4": not a number'),
    ('RUN_MATRIX=y MATRIX_LRS="1e-3,inf"', "not a finite number ('inf')"),
    ('RUN_MATRIX=y MATRIX_LRS="1e-3,,3e-3"', "not a number (''); write comma-separated floats"),
])
def test_floats_must_be_finite_numbers_within_their_range(text, reason):
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides(text))
    assert reason in e.value.problems[0]


def test_every_float_symbol_states_a_finite_range():
    kconf, _ = resolve([])
    floats = [s for s in kconf.unique_defined_syms if float_spec(s)]
    assert len(floats) >= 30
    for sym in floats:
        spec = float_spec(sym)
        node = sym.nodes[0]
        assert -1e300 < spec.lo <= spec.hi < 1e300, f"{node.filename}:{node.linenr}: {sym.name} needs (float LO..HI)"


@pytest.mark.parametrize("text, first, problem", [
    ("LR=1e-3 MIN_LR=1e-2", "SET:2", "CONFIG_MIN_LR=0.01 is above CONFIG_LR=0.001: the cosine 'decay' would raise "
                                     "the rate; set MIN_LR at or below LR (typical: LR/10) (CONFIG_LR from SET:1)"),
    ("LR_WSD=y MIN_LR=1", "SET:2", "the WSD 'decay' would raise the rate"),
    ("WARMUP_ITERS=100 LR_DECAY_ITERS=100", "SET:2", "CONFIG_LR_DECAY_ITERS=100 is not after CONFIG_WARMUP_ITERS=100"),
    ("LR_WSD=y MAX_ITERS=1000 WARMUP_ITERS=900", "SET:3",
     "CONFIG_WARMUP_ITERS=900 ends after the WSD decay starts at step 800 (CONFIG_MAX_ITERS=1000 x "
     "(1 - CONFIG_WSD_DECAY_FRACTION=0.2))"),
    ("WARMUP_ITERS=100 MAX_ITERS=40", "SET:1", "CONFIG_WARMUP_ITERS=100 is not below CONFIG_MAX_ITERS=40: the run "
                                               "would end still in warmup, never training at LR; lower WARMUP_ITERS "
                                               "(typical: 1-5% of MAX_ITERS, e.g. 2) or raise MAX_ITERS "
                                               "(CONFIG_MAX_ITERS from SET:2)"),
    ("LR_WSD=y MAX_ITERS=100 WARMUP_ITERS=100", "SET:3", "CONFIG_WARMUP_ITERS=100 is not below CONFIG_MAX_ITERS=100"),
])
def test_schedule_rules_name_both_symbols_values_and_places(text, first, problem):
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides(text))
    [found] = e.value.problems
    assert found.startswith(f"{first}: ") and problem in found


def test_schedule_rules_name_the_file_line_and_default(tmp_path):
    [problem] = errors_for(tmp_path, 'CONFIG_PLAN_NAME="x"\nCONFIG_MIN_LR="1e-2"\n')
    assert problem.startswith(f"{tmp_path / 'bad_defconfig'}:2: CONFIG_MIN_LR=0.01 is above CONFIG_LR=0.0006")
    assert problem.endswith("(CONFIG_LR from optim/Kconfig:42 (default))")


@pytest.mark.parametrize("text", [
    "LR_CONSTANT=y LR=1e-3",  # no MIN_LR: nothing decays
    "LR_DECAY_ITERS=5000 MAX_ITERS=1000",  # stops mid-cosine, e.g. to be extended
    "LR_DECAY_ITERS=500 MAX_ITERS=1000",  # decays, then holds MIN_LR
    "LR_WSD=y MAX_ITERS=1000 WARMUP_ITERS=800",  # warmup ends exactly where the decay starts
    "LR=1e-3 MIN_LR=1e-3",
])
def test_schedule_rules_allow_what_lr_at_handles(text):
    resolve([], parse_overrides(text))


@pytest.mark.parametrize("text, symbol", [
    ('RUNS_DIR=""', "RUNS_DIR"), ("RUNS_DIR=.", "RUNS_DIR"), ('RUNS_DIR="  "', "RUNS_DIR"),
    (f"RUNS_DIR={ROOT}", "RUNS_DIR"), ('DATA_CACHE_DIR=""', "DATA_CACHE_DIR"), ("DATA_CACHE_DIR=./", "DATA_CACHE_DIR"),
])
def test_output_folders_that_are_the_tree_itself_are_refused(text, symbol):
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides(text))
    [problem] = e.value.problems
    assert problem.startswith(f"SET:1: CONFIG_{symbol}=") and "the top of the source tree" in problem
    assert ("empty" in problem) == (not text.split("=", 1)[1].strip("\" "))


@pytest.mark.parametrize("name", ["a" * 201, "", "-x", ".hidden", "a b", "a/b", "café"])
def test_bad_plan_names_are_refused_at_load(name):
    with pytest.raises(ConfigError) as e:
        resolve([], parse_overrides(f"PLAN_NAME='{name}'"))
    [problem] = e.value.problems
    assert problem.startswith("SET:1: CONFIG_PLAN_NAME=") and "use 1 to 200 letters, digits" in problem


def test_longest_plan_name_makes_a_plan_directory(tmp_path):
    from plan.plan import Plan

    name = "p" * 200
    resolve([], parse_overrides(f"PLAN_NAME={name}"))
    plans = [Plan.create(tmp_path, name, "single", [{"name": "r" * 120}]) for _ in range(2)]
    assert plans[1].path.name.endswith("-2") and all(len(p.path.name.encode()) <= 255 for p in plans)
    (plans[1].path / ("r" * 120)).mkdir()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from kconfig.atomic import write_text_if_changed

    old = os.umask(umask)
    try:
        write_text_if_changed(tmp_path / "plan.json", "{}\n")
        kconf, _ = resolve([])
        write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
        write_min_config(kconf, tmp_path / "defconfig")
    finally:
        os.umask(old)
    for name in ("plan.json", ".config", "config.py", "defconfig"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config", "config.py", "defconfig", "plan.json"]


def test_reports_plots_and_prepared_data_honour_the_umask(tmp_path):
    """What teammates read on a shared disk: report.md, the plots, the token cache folder."""
    from data.prepare import prepare
    from plan.plan import Plan
    from plan.report import write_report

    old = os.umask(0o002)
    try:
        plan = Plan.create(tmp_path / "runs", "p", "single", [{"name": "base"}])
        (plan.run_dir("base")).mkdir()
        (plan.run_dir("base") / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2.0, "elapsed_s": 1}\n')
        plan.update("base", status="done")
        written = write_report(plan.path)
        (tmp_path / "corpus.txt").write_text("some text to tokenize\n" * 200)
        cfg = config_of(DATA_PATH=str(tmp_path / "corpus.txt"), DATA_CACHE_DIR=str(tmp_path / "cache"))
        data = prepare(cfg, ROOT, log=lambda m: None)
    finally:
        os.umask(old)
    assert any(p.suffix == ".png" for p in written)
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o664, p
    assert data.path.stat().st_mode & 0o777 == 0o775


def test_an_unquoted_value_with_spaces_says_to_quote_it():
    with pytest.raises(ConfigError) as e:
        parse_overrides("SAMPLE_PROMPT=$(shell touch /tmp/x)")
    assert e.value.problems == ["SET item 2: 'touch' is not NAME=value; a value with spaces needs quotes around "
                                "it, e.g. SET='SAMPLE_PROMPT=\"two words\"'"]


def test_a_hex_looking_int_says_what_to_write(tmp_path):
    [problem] = errors_for(tmp_path, "CONFIG_SEED=0x1e\n")
    assert problem.endswith("malformed integer '0x1e': write a decimal integer such as CONFIG_SEED=30")
