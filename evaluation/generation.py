"""Generation quality for ``make eval``: fixed prompts, seeded continuations, and their diversity numbers.

The prompts come from CONFIG_EVAL_GEN_PROMPTS (a file, one prompt a line) or, by default, are
cut from the run's validation text, so every run of a plan is prompted alike. Each continuation
is drawn through train/sample.py's ``generate_text`` (our KV-cached ``GPT.generate``, the
Sampling menu's temperature, top-k, top-p and stop strings), sample i with seed SEED + i, so
adding prompts leaves the earlier samples as they were. ``quality`` measures the continuations:
distinct-1/2 (Li et al. 2016, corpus level), the rate of repeated 4-grams within a sample and
the mean length. The samples themselves go to ``<run>/eval/samples.txt``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from data.tokenizer import Tokenizer
from kconfig.atomic import atomic_write
from kconfig.errors import NamedError
from train.sample import SampleConfig, generate_text

PROMPT_CHARS = 64  # a prompt cut from the validation text: one line, at most this many characters
REPEAT_N = 4  # repeated_ngram_rate counts repeats of n-grams of this many tokens
SAMPLES_FILE = "samples.txt"
SEPARATOR = "=" * 72


class GenerationPromptError(NamedError):
    """The generation prompts (CONFIG_EVAL_GEN_PROMPTS or the validation text) cannot be used."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The Evaluation menu's generation settings and the Sampling menu they sample with; defaults are Kconfig's."""

    samples: int = 8  # continuations to generate; 0 = generation metrics off
    tokens: int = 100  # the most tokens per continuation
    prompts_file: str = ""  # one prompt a line; empty: prompts cut from the validation text
    sampling: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    @classmethod
    def from_config(cls, cfg) -> GenerationConfig:
        return cls(samples=cfg.EVAL_GEN_SAMPLES, tokens=cfg.EVAL_GEN_TOKENS, prompts_file=cfg.EVAL_GEN_PROMPTS,
                   sampling=SampleConfig.from_config(cfg))

    @property
    def enabled(self) -> bool:
        return self.samples > 0


# --------------------------------------------------------------------------- prompts

def prompts_for(gen_config: GenerationConfig, val_text: str, root: Path, tokenizer: Tokenizer) -> list[str]:
    """The prompts: every non-blank line of CONFIG_EVAL_GEN_PROMPTS's file (a literal ``\\n`` in a line is a
    newline; a relative path is taken from ``root``), else ``samples`` prompts cut from the validation text
    (``prompts_from_text``). Each must be encodable by ``tokenizer``; a missing or empty file, or a prompt the
    tokenizer cannot encode, is a GenerationPromptError naming the file and line. [] when generation is off."""
    if not gen_config.enabled:
        return []
    if not gen_config.prompts_file:
        prompts = prompts_from_text(val_text, gen_config.samples)
        if not prompts:
            raise GenerationPromptError("the validation text has no non-blank line to cut generation prompts "
                                        "from; set CONFIG_EVAL_GEN_PROMPTS to a file of prompts, one per line")
        for i, prompt in enumerate(prompts):
            _check_encodable(tokenizer, prompt, f"generation prompt {i + 1} (cut from the validation text)")
        return prompts
    path = Path(gen_config.prompts_file)
    path = path if path.is_absolute() else Path(root) / path
    where = f"CONFIG_EVAL_GEN_PROMPTS={gen_config.prompts_file!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationPromptError(f"{where}: no file {path}; create it (one prompt per line) or set "
                                    "CONFIG_EVAL_GEN_PROMPTS=\"\" to cut prompts from the validation text") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationPromptError(f"{where}: cannot read {path} as UTF-8 text ({e})") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prompt = line.replace("\\n", "\n")
        _check_encodable(tokenizer, prompt, f"{path}:{lineno} (CONFIG_EVAL_GEN_PROMPTS)")
        prompts.append(prompt)
    if not prompts:
        raise GenerationPromptError(f"{where}: {path} has no prompt (every line is blank); write one prompt "
                                    "per line, or set CONFIG_EVAL_GEN_PROMPTS=\"\"")
    return prompts


def prompts_from_text(text: str, count: int, chars: int = PROMPT_CHARS) -> list[str]:
    """``count`` prompts at evenly spaced starts of the text's non-blank lines: each the line from its start
    through its line break, or its first ``chars`` characters when it is longer. Fewer such lines than
    ``count``: lines are used again (each sample still draws with its own seed). [] for a text without any."""
    starts, at = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            starts.append(at)
        at += len(line)
    if not starts or count <= 0:
        return []
    prompts = []
    for k in range(count):
        start = starts[k * len(starts) // count]
        end = text.find("\n", start, start + chars)
        prompts.append(text[start: start + chars] if end < 0 else text[start: end + 1])
    return prompts


def _check_encodable(tokenizer: Tokenizer, prompt: str, where: str) -> None:
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        raise GenerationPromptError(f"{where}: prompt {prompt!r} cannot be encoded by this run's {tokenizer.kind} "
                                    f"tokenizer ({e}); use only text the tokenizer was trained on") from None


# --------------------------------------------------------------------------- generation

def generate_samples(model, tokenizer: Tokenizer, prompts: list[str], gen_config: GenerationConfig,
                     device) -> list[str]:
    """One continuation per prompt (the prompt excluded, cut before the first stop string), sample i drawn with
    seed ``sampling.seed + i`` and up to ``gen_config.tokens`` tokens."""
    continuations = []
    for i, prompt in enumerate(prompts):
        sample = dataclasses.replace(gen_config.sampling, prompt=prompt, tokens=gen_config.tokens,
                                     seed=gen_config.sampling.seed + i)
        text = generate_text(model, tokenizer, sample, device)
        # generate_text's continuation starts where the decoded prompt ends (or where the two first differ)
        prompt_text = tokenizer.decode(tokenizer.encode(prompt))
        continuations.append(text[len(os.path.commonprefix([text, prompt_text])):])
    return continuations


# --------------------------------------------------------------------------- metrics

def _ngrams(units: list, n: int) -> list[tuple]:
    return [tuple(units[i: i + n]) for i in range(len(units) - n + 1)]


def distinct(sequences: list[list], n: int) -> float | None:
    """Distinct-n over all sequences together: the number of different n-grams (within a sequence, never across
    two) divided by the number of n-grams; None when no sequence has n units."""
    grams = [g for units in sequences for g in _ngrams(units, n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(sequences: list[list], n: int = REPEAT_N) -> float | None:
    """Of a sequence's n-gram positions j (n-grams starting at unit j, j = 0 .. len - n), the fraction whose
    n-gram already occurs at an earlier position k < j of the same sequence (overlaps count), averaged over the
    sequences that have at least one n-gram; None when none has. 0 for text that never repeats itself, towards 1
    for a loop."""
    rates = []
    for units in sequences:
        grams = _ngrams(units, n)
        if grams:
            seen, repeats = set(), 0
            for gram in grams:
                repeats += gram in seen
                seen.add(gram)
            rates.append(repeats / len(grams))
    return sum(rates) / len(rates) if rates else None


def quality(samples: list[str], tokenizer: Tokenizer) -> dict:
    """Diversity and length of the generated continuations.

    Units are the run's tokens (each sample re-encoded by ``tokenizer``) unless the key says ``words``
    (whitespace-separated words, comparable across tokenizers): ``distinct_1``, ``distinct_2`` and
    ``distinct_1_words``, ``distinct_2_words`` (see ``distinct``); ``repeated_ngram_rate`` (4-grams of tokens,
    see ``repeated_ngram_rate``); ``mean_length`` (tokens) and ``mean_length_chars`` (characters) per sample;
    ``samples``, their count. A value is None where no sample is long enough to measure it. Re-encoding gives
    the generated ids back for char tokenizers; a SentencePiece or BPE text may re-encode to other pieces, and
    bytes that are no valid UTF-8 decode to U+FFFD (3 bytes again), so an untrained byte model's samples
    measure longer than the tokens it generated."""
    tokens = [tokenizer.encode(s) for s in samples]
    words = [s.split() for s in samples]
    count = len(samples)
    return {"distinct_1": distinct(tokens, 1), "distinct_2": distinct(tokens, 2),
            "distinct_1_words": distinct(words, 1), "distinct_2_words": distinct(words, 2),
            "repeated_ngram_rate": repeated_ngram_rate(tokens),
            "mean_length": sum(map(len, tokens)) / count if count else None,
            "mean_length_chars": sum(map(len, samples)) / count if count else None,
            "samples": count}


# --------------------------------------------------------------------------- files

def format_samples(prompts: list[str], samples: list[str]) -> str:
    """Each sample as a header, its prompt and its continuation, then a separator line."""
    parts = []
    for i, (prompt, continuation) in enumerate(zip(prompts, samples, strict=True)):
        parts += [f"sample {i + 1} of {len(samples)}", "--- prompt ---", prompt.rstrip("\n"),
                  "--- continuation ---", continuation.rstrip("\n"), SEPARATOR]
    return "".join(part + "\n" for part in parts)


def write_samples(path: Path, prompts: list[str], samples: list[str]) -> None:
    """The prompts and their continuations as a readable text file, written atomically."""
    text = format_samples(prompts, samples)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def generation_eval(model, tokenizer: Tokenizer, gen_config: GenerationConfig, val_text: str, run_eval_dir: Path,
                    root: Path, device) -> dict | None:
    """Prompts, continuations, ``run_eval_dir/samples.txt`` and their ``quality``, plus ``"file"``: the samples
    file relative to the run directory (``run_eval_dir``'s parent), e.g. ``eval/samples.txt``. None when
    CONFIG_EVAL_GEN_SAMPLES=0 (off): nothing is generated or written."""
    if not gen_config.enabled:
        return None
    prompts = prompts_for(gen_config, val_text, root, tokenizer)
    samples = generate_samples(model, tokenizer, prompts, gen_config, device)
    run_eval_dir = Path(run_eval_dir)
    write_samples(run_eval_dir / SAMPLES_FILE, prompts, samples)
    return {**quality(samples, tokenizer), "file": f"{run_eval_dir.name}/{SAMPLES_FILE}"}
