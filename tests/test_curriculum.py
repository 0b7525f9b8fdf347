"""Sequence-length curriculum and batch-size warmup: stage boundaries, tokens, LR multipliers, errors."""

from __future__ import annotations

import math

import pytest

from conftest import config_of
from train.curriculum import Curriculum, CurriculumError, Stage, parse_stages

BASE = "MICRO_BATCH=16 BLOCK_SIZE=256 GRAD_ACCUM=4 MAX_ITERS=1000"
CURRICULUM = 'CURRICULUM=y CURRICULUM_STAGES="64:0 128:0.25 256:0.5"'


def cfg(text: str = "", base: str = BASE):
    return config_of("WARMUP_ITERS=1 " + base, text)


def curriculum(text: str = "", base: str = BASE) -> Curriculum:
    return Curriculum.from_config(cfg(text, base))


def brute_tokens_before(c: Curriculum, step: int) -> int:
    return sum(c.tokens_at(s) for s in range(step))


def test_off_by_default_is_one_plain_stage():
    c = curriculum()
    assert c.stages == (Stage(1, 256, 16, 0),)
    assert not c.active
    assert c.shapes() == {(16, 256)}
    assert [c.grad_accum_at(s) for s in (0, 500, 999)] == [4, 4, 4]
    assert c.tokens_at(0) == 16 * 256 * 4 and c.tokens_before(1000) == 1000 * 16 * 256 * 4
    assert c.lr_scale_at(0) == 1.0
    assert c.describe() == "stage 1: seq 256 x micro-batch 16 from step 0 (0 tokens)"


def test_stage_boundaries_are_floor_of_fraction_times_max_iters():
    c = curriculum(CURRICULUM)
    assert [(s.index, s.seq_len, s.start_step) for s in c.stages] == [(1, 64, 0), (2, 128, 250), (3, 256, 500)]
    assert c.stage_at(0).seq_len == 64 and c.stage_at(249).seq_len == 64
    assert c.stage_at(250).seq_len == 128 and c.stage_at(499).seq_len == 128
    assert c.stage_at(500).seq_len == 256 and c.stage_at(999).seq_len == 256
    assert c.active
    odd = curriculum(CURRICULUM, base="MICRO_BATCH=16 BLOCK_SIZE=256 MAX_ITERS=999")
    assert [s.start_step for s in odd.stages] == [0, 249, 499]  # floor(0.25 x 999), floor(0.5 x 999)
    # The fraction is taken as written: 0.29 x 100 is 29, not floor(28.999999999999996).
    exact = curriculum('CURRICULUM=y CURRICULUM_STAGES="128:0 256:0.29"', base="MAX_ITERS=100")
    assert exact.stages[1].start_step == 29


def test_keep_tokens_grows_the_micro_batch_and_keeps_tokens_per_step_constant():
    c = curriculum(CURRICULUM)
    assert [s.micro_batch for s in c.stages] == [64, 32, 16]
    for step in range(1000):
        stage = c.stage_at(step)
        assert stage.micro_batch * stage.seq_len * c.grad_accum_at(step) == 16 * 256 * 4 == c.tokens_at(step)
    assert c.tokens_before(1000) == 1000 * 16 * 256 * 4
    assert c.lr_scale_at(0) == 1.0
    assert c.describe().splitlines() == [
        "stage 1: seq 64 x micro-batch 64 from step 0 (0 tokens)",
        "stage 2: seq 128 x micro-batch 32 from step 250 (4,096,000 tokens)",
        "stage 3: seq 256 x micro-batch 16 from step 500 (8,192,000 tokens)",
    ]


def test_keep_batch_has_fewer_tokens_in_short_stages_and_lr_rules_follow_the_ratio():
    keep = CURRICULUM + " CURRICULUM_KEEP_BATCH=y"
    c = curriculum(keep)
    assert [s.micro_batch for s in c.stages] == [16, 16, 16]
    assert [c.tokens_at(s) for s in (0, 250, 500)] == [16 * 64 * 4, 16 * 128 * 4, 16 * 256 * 4]
    assert c.tokens_before(1000) == 250 * 4096 + 250 * 8192 + 500 * 16384
    assert [c.lr_scale_at(s) for s in (0, 250, 500)] == [1.0, 1.0, 1.0]  # CURRICULUM_LR_NONE
    sqrt = curriculum(keep + " CURRICULUM_LR_SQRT=y")
    assert [sqrt.lr_scale_at(s) for s in (0, 250, 500)] == [0.5, math.sqrt(0.5), 1.0]
    linear = curriculum(keep + " CURRICULUM_LR_LINEAR=y")
    assert [linear.lr_scale_at(s) for s in (0, 250, 500)] == [0.25, 0.5, 1.0]


def test_batch_warmup_ramps_micro_batches_in_equal_stairs():
    # GRAD_ACCUM=8, start ceil(0.25 x 8) = 2, over floor(0.1 x 1000) = 100 steps: 2 + 6 * step // 100.
    c = curriculum('BATCH_WARMUP_FRACTION="0.1" BATCH_WARMUP_START="0.25"',
                   base="MICRO_BATCH=16 BLOCK_SIZE=256 GRAD_ACCUM=8 MAX_ITERS=1000")
    ramp = {0: 2, 16: 2, 17: 3, 50: 5, 83: 6, 84: 7, 99: 7, 100: 8, 999: 8, 5000: 8}
    assert {s: c.grad_accum_at(s) for s in ramp} == ramp
    assert [sum(c.grad_accum_at(s) == a for s in range(100)) for a in range(2, 8)] == [17, 17, 16, 17, 17, 16]
    assert c.shapes() == {(16, 256)} and c.active  # shapes never change for warmup
    assert c.tokens_at(0) == 2 * 16 * 256
    assert c.describe().splitlines()[-1] == "batch warmup: 2 -> 8 micro-batches per step over steps 0-99"
    start_rounds_up = curriculum('BATCH_WARMUP_FRACTION="0.1" BATCH_WARMUP_START="0.1"',
                                 base="GRAD_ACCUM=30 MAX_ITERS=1000")
    assert start_rounds_up.grad_accum_at(0) == 3  # ceil(0.1 x 30) = 3, not ceil(3.0000000000000004)


def test_warmup_lr_rule_uses_the_token_ratio():
    c = curriculum('BATCH_WARMUP_FRACTION="0.5" BATCH_WARMUP_START="0.25" CURRICULUM_LR_SQRT=y',
                   base="GRAD_ACCUM=4 MAX_ITERS=100")
    assert [c.grad_accum_at(s) for s in (0, 16, 17, 33, 34, 49, 50)] == [1, 1, 2, 2, 3, 3, 4]
    assert [c.lr_scale_at(s) for s in (0, 17, 50)] == [0.5, math.sqrt(0.5), 1.0]


@pytest.mark.parametrize("text, base", [
    (CURRICULUM + ' BATCH_WARMUP_FRACTION="0.3" BATCH_WARMUP_START="0.25"', BASE),
    (CURRICULUM + ' CURRICULUM_KEEP_BATCH=y BATCH_WARMUP_FRACTION="0.37" BATCH_WARMUP_START="0.1"',
     "MICRO_BATCH=3 BLOCK_SIZE=256 GRAD_ACCUM=7 MAX_ITERS=997"),
    ('BATCH_WARMUP_FRACTION="1" BATCH_WARMUP_START="0.01"', "GRAD_ACCUM=300 MAX_ITERS=50"),
])
def test_tokens_before_matches_a_brute_force_sum(text, base):
    c = curriculum(text, base)
    iters = cfg(text, base).MAX_ITERS
    running = 0
    for step in range(iters + 20):
        assert c.tokens_before(step) == running, step
        running += c.tokens_at(step)
    assert c.tokens_before(iters) == brute_tokens_before(c, iters)


def test_tokens_before_is_fast_for_a_million_steps():
    c = curriculum(CURRICULUM + ' CURRICULUM_KEEP_BATCH=y BATCH_WARMUP_FRACTION="0.2"',
                   base="MICRO_BATCH=16 BLOCK_SIZE=256 GRAD_ACCUM=64 MAX_ITERS=1000000")
    assert c.grad_accum_at(0) == 16 and c.grad_accum_at(200_000) == 64
    assert c.tokens_before(1_000_000) == c.tokens_before(500_000) + 500_000 * 16 * 256 * 64
    assert c.tokens_before(250_000) == sum(16 * 64 * (16 + 48 * s // 200_000) for s in range(200_000)) \
        + 50_000 * 16 * 64 * 64


def test_shapes_are_bounded_by_the_number_of_stages():
    c = curriculum('CURRICULUM=y CURRICULUM_STAGES="32:0 64:0.1 128:0.2 256:0.4" BATCH_WARMUP_FRACTION="0.5"')
    assert c.shapes() == {(128, 32), (64, 64), (32, 128), (16, 256)}
    assert len({(c.stage_at(s).micro_batch, c.stage_at(s).seq_len) for s in range(1000)}) == len(c.stages) == 4


def test_stages_that_get_no_steps_are_skipped():
    c = curriculum(CURRICULUM, base="MICRO_BATCH=16 BLOCK_SIZE=256 MAX_ITERS=3")
    assert [(s.index, s.start_step) for s in c.stages] == [(2, 0), (3, 1)]  # 0.25 x 3 -> 0, 0.5 x 3 -> 1
    assert c.stage_at(0).seq_len == 128 and c.stage_at(2).seq_len == 256
    assert "skipped (no steps at this MAX_ITERS): stage 1 (seq 64)" in c.describe()


def test_a_short_last_stage_is_allowed():
    c = curriculum('CURRICULUM=y CURRICULUM_STAGES="64:0 128:0.5"')
    assert c.stage_at(999) == Stage(2, 128, 32, 500)


def test_parse_stages():
    assert parse_stages("64:0 128:0.25  256:0.5", 256) == [(64, 0.0), (128, 0.25), (256, 0.5)]
    assert parse_stages("256:0", 256) == [(256, 0.0)]


@pytest.mark.parametrize("text, message", [
    ("", "CONFIG_CURRICULUM_STAGES is empty"),
    ("64:0 128", "CONFIG_CURRICULUM_STAGES: stage 2 '128' is not SEQ_LEN:START_FRACTION"),
    ("64:0 x:0.5", "stage 2 'x:0.5' is not SEQ_LEN:START_FRACTION"),
    ("64:0 128:half", "stage 2 '128:half' is not SEQ_LEN:START_FRACTION"),
    ("0:0", "stage 1 '0:0' is not SEQ_LEN:START_FRACTION"),
    ("64:0,128:0.5", "stage 1 '64:0,128:0.5' is not SEQ_LEN:START_FRACTION"),
    ("64:0.1 128:0.5", "CONFIG_CURRICULUM_STAGES: stage 1 '64:0.1' starts at 0.1; the first stage must start at 0"),
    ("64:0 128:1", "stage 2 '128:1' starts at 1; start fractions must be in [0, 1)"),
    ("64:0 128:-0.5", "stage 2 '128:-0.5' starts at -0.5; start fractions must be in [0, 1)"),
    ("64:0 128:0.5 256:0.5", "stage 3 '256:0.5' starts before or with stage 2 '128:0.5'"),
    ("64:0 128:0.5 256:0.25", "stage 3 '256:0.25' starts before or with stage 2 '128:0.5'"),
    ("128:0 64:0.5", "stage 2 '64:0.5' is not longer than stage 1 '128:0'"),
    ("64:0 512:0.5", "stage 2 '512:0.5' is longer than CONFIG_BLOCK_SIZE=256; shorten the stage or raise BLOCK_SIZE"),
])
def test_parse_errors_name_the_symbol_and_the_stage(text, message):
    with pytest.raises(CurriculumError) as e:
        parse_stages(text, 256)
    assert message in str(e.value) and "CONFIG_CURRICULUM_STAGES" in str(e.value)


def test_from_config_reports_parse_errors():
    with pytest.raises(CurriculumError, match="CONFIG_BLOCK_SIZE=128"):
        curriculum(CURRICULUM, base="BLOCK_SIZE=128")


def test_keep_tokens_needs_a_whole_micro_batch():
    with pytest.raises(CurriculumError) as e:
        curriculum('CURRICULUM=y CURRICULUM_STAGES="96:0 256:0.5"', base="MICRO_BATCH=16 BLOCK_SIZE=256")
    assert str(e.value) == (
        "CONFIG_CURRICULUM_STAGES: stage 1 '96:0' with CONFIG_CURRICULUM_KEEP_TOKENS needs MICRO_BATCH x "
        "BLOCK_SIZE (16 x 256 = 4096) to be divisible by 96; use a length that divides 4096 (a power of two "
        "usually does), or choose CURRICULUM_KEEP_BATCH")
    c = curriculum('CURRICULUM=y CURRICULUM_STAGES="96:0 256:0.5" CURRICULUM_KEEP_BATCH=y')
    assert c.shapes() == {(16, 96), (16, 256)}


def test_batch_warmup_needs_grad_accum():
    with pytest.raises(CurriculumError) as e:
        curriculum('BATCH_WARMUP_FRACTION="0.1"', base="GRAD_ACCUM=1")
    assert "CONFIG_BATCH_WARMUP_FRACTION=0.1" in str(e.value)
    assert "CONFIG_GRAD_ACCUM=1" in str(e.value) and "raise GRAD_ACCUM to at least 2" in str(e.value)
    assert curriculum("", base="GRAD_ACCUM=1").grad_accum_at(0) == 1  # warmup off: GRAD_ACCUM=1 is fine


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step -1 is negative"):
        curriculum().tokens_at(-1)
