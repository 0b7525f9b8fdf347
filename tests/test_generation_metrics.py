"""evaluation/generation.py: prompts from a file or the validation text, seeded continuations without their
prompt, and distinct-n, repeated 4-gram rate and lengths checked against hand computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import config_of
from data.tokenizer import Tokenizer
from evaluation.generation import (GenerationConfig, GenerationPromptError, distinct, format_samples,
                                   generate_samples, generation_eval, prompts_for, prompts_from_text, quality,
                                   repeated_ngram_rate, write_samples)
from model.gpt import GPT, ModelConfig
from train.sample import SampleConfig, generate_text

BYTES = Tokenizer({"kind": "byte"})
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n    y = 0\n" * 3
CHARS = Tokenizer.fit("char", TEXT)
CPU = torch.device("cpu")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).eval()


def test_config_defaults_are_kconfigs_and_symbols_reach_it():
    assert GenerationConfig.from_config(config_of()) == GenerationConfig()
    gen = GenerationConfig.from_config(config_of(EVAL_GEN_SAMPLES=3, EVAL_GEN_TOKENS=7, EVAL_GEN_PROMPTS="p.txt",
                                                 SAMPLE_TOP_P="0.9", SAMPLE_STOP="\\n", SEED=5))
    assert (gen.samples, gen.tokens, gen.prompts_file) == (3, 7, "p.txt")
    assert (gen.sampling.top_p, gen.sampling.stop, gen.sampling.seed) == (0.9, ("\n",), 5)
    assert gen.enabled and not GenerationConfig(samples=0).enabled


# --------------------------------------------------------------------------- metrics by hand

def test_quality_by_hand_on_bytes():
    # "a a a a": 7 byte tokens a␣a␣a␣a; "a b c d": a␣b␣c␣d
    one = quality(["a a a a"], BYTES)
    assert one["distinct_1"] == pytest.approx(2 / 7)  # {a, ␣} of 7 tokens
    assert one["distinct_2"] == pytest.approx(2 / 6)  # {a␣, ␣a} of 6 bigrams
    assert one["distinct_1_words"] == pytest.approx(1 / 4) and one["distinct_2_words"] == pytest.approx(1 / 3)
    # 4-grams at 0..3: a␣a␣, ␣a␣a, a␣a␣ (repeats 0), ␣a␣a (repeats 1): 2 of 4 positions
    assert one["repeated_ngram_rate"] == pytest.approx(0.5)
    assert (one["mean_length"], one["mean_length_chars"], one["samples"]) == (7, 7, 1)
    fresh = quality(["a b c d"], BYTES)
    assert fresh["distinct_1"] == pytest.approx(5 / 7) and fresh["distinct_2"] == 1.0
    assert fresh["distinct_1_words"] == 1.0 and fresh["distinct_2_words"] == 1.0
    assert fresh["repeated_ngram_rate"] == 0.0
    both = quality(["a a a a", "a b c d"], BYTES)
    assert both["distinct_1"] == pytest.approx(5 / 14)  # {a, ␣, b, c, d} over both samples' 14 tokens
    assert both["distinct_2"] == pytest.approx(7 / 12)  # a␣ ␣a ␣b b␣ ␣c c␣ ␣d; no bigram across samples
    assert both["distinct_1_words"] == pytest.approx(4 / 8) and both["distinct_2_words"] == pytest.approx(4 / 6)
    assert both["repeated_ngram_rate"] == pytest.approx((0.5 + 0.0) / 2)  # a mean over samples
    assert (both["mean_length"], both["mean_length_chars"], both["samples"]) == (7, 7, 2)


def test_quality_counts_tokens_of_the_runs_tokenizer():
    # "é" is 2 bytes but 1 character: token lengths follow the tokenizer, characters do not.
    q = quality(["éé", "ab"], BYTES)
    assert (q["mean_length"], q["mean_length_chars"]) == (3, 2)


def test_repeats_and_too_short_samples():
    assert repeated_ngram_rate([list("aaaaa")]) == pytest.approx(1 / 2)
    assert repeated_ngram_rate([list("abababab")]) == pytest.approx(3 / 5)  # abab baba [abab baba abab]
    assert repeated_ngram_rate([list("abc"), list("aaaaa")]) == pytest.approx(1 / 2)  # "abc" has no 4-gram
    assert repeated_ngram_rate([list("abc")]) is None and distinct([[]], 1) is None
    empty = quality([""], BYTES)
    assert empty["distinct_1"] is None and empty["repeated_ngram_rate"] is None and empty["mean_length"] == 0
    none = quality([], BYTES)
    assert none["samples"] == 0 and none["mean_length"] is None


# --------------------------------------------------------------------------- prompts

def test_prompts_from_text_are_evenly_spaced_line_starts():
    text = "first line\n\nsecond\nthird " + "x" * 80 + "\nfourth\n"
    assert prompts_from_text(text, 2) == ["first line\n", "third " + "x" * 58]  # non-blank lines 0 and 2 of 4
    assert prompts_from_text(text, 4) == ["first line\n", "second\n", "third " + "x" * 58, "fourth\n"]
    assert prompts_from_text(text, 6) == prompts_from_text(text, 6)  # deterministic
    assert prompts_from_text(text, 6)[:2] == ["first line\n", "first line\n"]  # fewer lines than samples
    assert prompts_from_text("no newline at the end", 1) == ["no newline at the end"]
    assert prompts_from_text("\n \n", 3) == []


def test_prompts_for_validation_text_and_file(tmp_path):
    gen = GenerationConfig(samples=3)
    assert prompts_for(gen, TEXT, tmp_path, CHARS) == prompts_from_text(TEXT, 3)
    assert prompts_for(GenerationConfig(samples=0), TEXT, tmp_path, CHARS) == []
    (tmp_path / "prompts.txt").write_text("def add(\n\n   \nclass Point:\\n    x\n")
    from_file = dataclasses.replace(gen, prompts_file="prompts.txt")  # relative to the root
    assert prompts_for(from_file, "", tmp_path, CHARS) == ["def add(", "class Point:\n    x"]
    absolute = dataclasses.replace(gen, prompts_file=str(tmp_path / "prompts.txt"))
    assert prompts_for(absolute, "", tmp_path / "elsewhere", CHARS) == ["def add(", "class Point:\n    x"]


def test_prompt_errors_name_file_line_and_symbol(tmp_path):
    gen = GenerationConfig(samples=2, prompts_file="missing.txt")
    with pytest.raises(GenerationPromptError, match=r"CONFIG_EVAL_GEN_PROMPTS='missing.txt': no file .*missing.txt"):
        prompts_for(gen, TEXT, tmp_path, CHARS)
    (tmp_path / "p.txt").write_text("def add(\n\nprint(z)\n")  # 'p' and 'z' are not in the char vocabulary
    with pytest.raises(GenerationPromptError, match=r"p.txt:3 \(CONFIG_EVAL_GEN_PROMPTS\): prompt 'print\(z\)'"):
        prompts_for(dataclasses.replace(gen, prompts_file="p.txt"), TEXT, tmp_path, CHARS)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(GenerationPromptError, match="has no prompt"):
        prompts_for(dataclasses.replace(gen, prompts_file="blank.txt"), TEXT, tmp_path, CHARS)
    with pytest.raises(GenerationPromptError, match="CONFIG_EVAL_GEN_PROMPTS"):
        prompts_for(GenerationConfig(samples=2), "\n\n", tmp_path, CHARS)


# --------------------------------------------------------------------------- generation

def test_continuations_exclude_the_prompt_and_keep_their_seed():
    model = tiny_model()
    gen = GenerationConfig(samples=3, tokens=12, sampling=SampleConfig(temperature=1.0, top_k=0, seed=7))
    prompts = ["def add(", "class Point:\n", "    return "]
    samples = generate_samples(model, CHARS, prompts, gen, CPU)
    for i, (prompt, continuation) in enumerate(zip(prompts, samples)):
        full = generate_text(model, CHARS, dataclasses.replace(gen.sampling, prompt=prompt, tokens=12, seed=7 + i), CPU)
        assert full == prompt + continuation and len(continuation) == 12  # char tokens: one character each
    assert len(set(samples)) == 3
    # Another prompt appended, or the same prompts again: the earlier samples are unchanged.
    assert generate_samples(model, CHARS, prompts + ["x = "], gen, CPU)[:3] == samples
    assert generate_samples(model, CHARS, prompts[:1], gen, CPU) == samples[:1]


def test_continuations_end_before_a_stop_string():
    model = tiny_model()
    free = GenerationConfig(samples=4, tokens=20, sampling=SampleConfig(temperature=1.0, top_k=0))
    prompts = ["def add(a, b):\n"] * 4
    unstopped = generate_samples(model, CHARS, prompts, free, CPU)
    stop = next(ch for ch in " ae" if any(ch in s for s in unstopped))
    stopped = generate_samples(model, CHARS, prompts, dataclasses.replace(
        free, sampling=dataclasses.replace(free.sampling, stop=(stop,))), CPU)
    assert stopped == [s.split(stop)[0] for s in unstopped]  # the same draws, cut before the stop string


def test_generation_eval_writes_samples_and_returns_metrics(tmp_path):
    model = tiny_model()
    gen = GenerationConfig(samples=2, tokens=10, sampling=SampleConfig(temperature=1.0, top_k=0, seed=3))
    result = generation_eval(model, CHARS, gen, TEXT, tmp_path / "run" / "eval", tmp_path, CPU)
    prompts = prompts_from_text(TEXT, 2)
    samples = generate_samples(model, CHARS, prompts, gen, CPU)
    assert result == {**quality(samples, CHARS), "file": "eval/samples.txt"}
    assert result["samples"] == 2 and result["mean_length"] == 10
    written = (tmp_path / "run" / "eval" / "samples.txt").read_text()
    assert written == format_samples(prompts, samples)
    assert written.startswith(f"sample 1 of 2\n--- prompt ---\n{prompts[0]}--- continuation ---\n")
    assert [p.name for p in (tmp_path / "run" / "eval").iterdir()] == ["samples.txt"]  # no temporary left
    assert generation_eval(model, CHARS, GenerationConfig(samples=0), TEXT, tmp_path / "off", tmp_path, CPU) is None
    assert not (tmp_path / "off").exists()


def test_write_samples_is_readable(tmp_path):
    write_samples(tmp_path / "s.txt", ["p1\n", "p2"], ["c1", "two\nlines\n"])
    assert (tmp_path / "s.txt").read_text() == (
        "sample 1 of 2\n--- prompt ---\np1\n--- continuation ---\nc1\n" + "=" * 72 + "\n"
        "sample 2 of 2\n--- prompt ---\np2\n--- continuation ---\ntwo\nlines\n" + "=" * 72 + "\n")
