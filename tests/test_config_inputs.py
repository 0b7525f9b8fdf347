"""Any configuration input is a valid config or a ConfigError naming its file, line or symbol; nothing else.

Property-based: hypothesis writes defconfig files (text, or bytes that may not be UTF-8), single
values of real symbols of every type, and SET strings, and feeds them to the loader.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from pathlib import Path

import kconfiglib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import config_of
from kconfig.errors import ConfigError
from kconfig.tree import load, new_kconfig, parse_file, parse_overrides, resolve, write_outputs
from kconfig.values import values

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TREE = new_kconfig()
SYMBOLS = {kind: sorted(s.name for s in _TREE.unique_defined_syms if s.orig_type == kind and s.nodes[0].prompt)
           for kind in (kconfiglib.BOOL, kconfiglib.INT, kconfiglib.STRING)}
NAMES = [name for names in SYMBOLS.values() for name in names]

# values that hit the edges: signs, zeros, digits, exponents, quotes, escapes, control and line-separator characters
ATOMS = ["", "y", "n", "0", "-1", "+3", "030", "1_000", " 7", "1e-3", "3e-4x", "inf", "nan", "1e999", "99999999999999999999", "-0.5", "2", "64",
         '"', '\\', "'", "$HOME", "$(shell x)", "\n", "\t", "\r", "\x00", "\x1b", "\u2028", "\x85", "é", " ", ",", "#"]
values_ = st.lists(st.sampled_from(ATOMS) | st.text(max_size=6), max_size=4).map("".join)


def assignment_line(name: str, value: str, quoted: bool) -> str:
    if quoted:
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"CONFIG_{name}={value}"


lines = st.one_of(
    st.builds(assignment_line, st.sampled_from(NAMES), values_, st.booleans()),
    st.builds(lambda n: f"# CONFIG_{n} is not set", st.sampled_from(NAMES)),
    st.sampled_from(["", "# a comment", "CONFIG_NO_SUCH=y", "SEED=1", "CONFIG_=1", "   "]),
    st.text(max_size=20),
)
defconfig_texts = st.lists(lines, max_size=8).map("\n".join)


def assert_named(problems: list[str], *places: str) -> None:
    """Every problem says where: a file or SET item, or a CONFIG_ symbol."""
    assert problems, "a ConfigError lists its problems"
    for problem in problems:
        assert any(p in problem for p in places) or "CONFIG_" in problem, problem


def assert_valid(kconf) -> None:
    cfg = values(kconf)
    for name, value in cfg.items():
        if isinstance(value, str):
            assert not re.search(r"[\x00-\x1f\x7f\x85\u2028\u2029]", value), (name, value)
    with tempfile.TemporaryDirectory() as tmp:  # what resolves also writes and reloads to the same values
        write_outputs(kconf, Path(tmp) / ".config", Path(tmp) / "config.py")
        assert load(Path(tmp) / ".config")[1] == cfg
        for line in (Path(tmp) / ".config").read_text().splitlines():  # ints as kconfiglib would write them
            name, _, value = line.removeprefix("CONFIG_").partition("=")
            if name in SYMBOLS[kconfiglib.INT]:
                assert value == str(int(value)), line


@SETTINGS
@given(text=defconfig_texts)
def test_any_defconfig_text_is_valid_or_a_named_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "defconfig"
        path.write_text(text, encoding="utf-8")
        try:
            kconf, _ = resolve(parse_file(path))
        except ConfigError as e:
            assert_named(e.problems, str(path))
            return
    assert_valid(kconf)


@SETTINGS
@given(data=st.binary(max_size=40), prefix=st.sampled_from([b"", b"CONFIG_SEED=1\n", b'CONFIG_PLAN_NAME="']))
def test_any_bytes_are_valid_or_a_named_error(data, prefix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".config"
        path.write_bytes(prefix + data)
        for snapshot in (False, True):
            try:
                resolve(parse_file(path, snapshot=snapshot))
            except ConfigError as e:
                assert_named(e.problems, str(path))
        try:
            load(path)
        except ConfigError as e:
            assert_named(e.problems, str(path))


@pytest.mark.slow
@SETTINGS
@given(name=st.sampled_from(NAMES), value=values_)
def test_any_value_of_a_real_symbol_through_set_is_valid_or_a_named_error(name, value):
    try:
        kconf, _ = resolve([], parse_overrides(f"{name}={shlex.quote(value)}"))
    except ConfigError as e:
        assert_named(e.problems, "SET")
        return
    assert_valid(kconf)


@SETTINGS
@given(text=st.lists(st.sampled_from(NAMES + ["CONFIG_SEED", "X", "=", "==", '"', "'", " ", "\n", "\\"]) | values_,
                     max_size=8).map("".join))
def test_any_set_string_is_valid_or_a_named_error(text):
    try:
        kconf, _ = resolve([], parse_overrides(text))
    except ConfigError as e:
        assert_named(e.problems, "SET")
        return
    assert_valid(kconf)


@pytest.mark.parametrize("text", ["", "SEED=1", 'DATA_PATH="a b"'])
def test_examples_the_properties_start_from(text):
    assert_valid(resolve([], parse_overrides(text))[0])


# --------------------------------------------------------------------------- up front: plan/preflight.py


@pytest.mark.parametrize("text, problem", [
    ("MODEL_SIZE_CUSTOM=y N_EMBD=30 N_HEAD=4", "CONFIG_N_EMBD=30 is not divisible by CONFIG_N_HEAD=4"),
    ("MODEL_SIZE_CUSTOM=y N_HEAD=4 N_KV_HEAD=3", "CONFIG_N_HEAD=4 is not divisible by CONFIG_N_KV_HEAD=3"),
    ("MOE=y MOE_FIRST_DENSE=4", "CONFIG_MOE=y but no block is MoE"),
    ('CURRICULUM=y CURRICULUM_STAGES="x"', "CONFIG_CURRICULUM_STAGES"),
])
def test_preflight_finds_what_setup_would_find(text, problem):
    from plan.preflight import problems

    found = problems(config_of(text), here=False)
    assert len(found) == 1 and problem in found[0], found


def test_preflight_finds_a_device_this_machine_lacks():
    import torch

    from plan.preflight import problems

    assert problems(config_of("")) == [] and problems(config_of("DEVICE_CPU=y")) == []
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert problems(config_of("DEVICE_CUDA=y"), here=False) == []
    [cuda] = problems(config_of("DEVICE_CUDA=y"))
    assert cuda.startswith("CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU on this machine")
    [fp16] = problems(config_of("DTYPE_FP16=y"))
    assert fp16.startswith("CONFIG_DTYPE_FP16=y needs a CUDA GPU")
    [fp8] = problems(config_of("FP8_TORCHAO=y"))
    assert fp8.startswith("CONFIG_FP8_TORCHAO=y needs an NVIDIA GPU")
    assert problems(config_of("FP8_TORCHAO=y FP8_EMULATE=y")) == []
    [procs] = problems(config_of("PARALLEL_DDP=y NPROC_PER_NODE=0"))
    assert procs.startswith("CONFIG_NPROC_PER_NODE=0 starts one process per GPU")


def test_data_problems_find_a_short_corpus_and_a_prompt_the_tokenizer_cannot_encode(tmp_path):
    from data.prepare import prepare
    from plan.preflight import data_problems

    (tmp_path / "tiny.txt").write_text("abcdefgh\n" * 40)  # 360 characters: 324 train, 36 val
    (tmp_path / "line.txt").write_text("abcdefgh " * 40)  # the same without a newline
    files = f"DATA_CACHE_DIR={tmp_path / 'cache'} DATA_PATH={tmp_path}/"
    cfg = config_of(f"{files}tiny.txt BLOCK_SIZE=64 SAMPLE_PROMPT='abc'")
    data = prepare(cfg, tmp_path, log=lambda m: None)
    [short] = data_problems(cfg, data)
    assert short.startswith("CONFIG_BLOCK_SIZE=64: the val split of ") and "has 36 tokens, fewer than the 66" in short
    assert data_problems(config_of(f"{files}tiny.txt BLOCK_SIZE=16"), data) == []
    [prompt] = data_problems(config_of(f"{files}tiny.txt BLOCK_SIZE=16 SAMPLE_PROMPT='€uro'"), data)
    assert prompt.startswith("CONFIG_SAMPLE_PROMPT='€uro': the run's char tokenizer cannot encode it") and "€" in prompt
    cfg = config_of(f"{files}line.txt BLOCK_SIZE=16")
    [empty] = data_problems(cfg, prepare(cfg, tmp_path, log=lambda m: None))
    assert empty.startswith("CONFIG_SAMPLE_PROMPT is empty, so samples start from a newline, but the run's char "
                            "tokenizer cannot encode it")
    cfg = config_of(f"{files}line.txt BLOCK_SIZE=16 TOKENIZER_BYTE=y SAMPLE_PROMPT='€uro'")
    assert data_problems(cfg, prepare(cfg, tmp_path, log=lambda m: None)) == []
