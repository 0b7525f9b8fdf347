"""Generation speed with and without the KV cache, side by side: python scripts/bench_sample.py

Times `make sample`-style generation (train/sample.py's generate_text: the prompt, temperature,
top-k/top-p and seed of the configuration) twice per case, with the KV cache and recomputing the
context every token, and prints tokens/s of each, the speedup and whether both drew the same text.
Two cases: the configured SAMPLE_TOKENS (past BLOCK_SIZE the context window slides and every step
recomputes it, cache or not), and the tokens that fit in one context (BLOCK_SIZE less the prompt),
where the cache feeds one token per step. The median of SAMPLE_BENCH_REPEATS runs (default 3).

The model: SAMPLE_BENCH_RUN=<run directory> (its newest checkpoint, tokenizer and sampling
settings, as `make sample` loads them), else the preset SAMPLE_BENCH_DEFCONFIG (default
quickstart) at random initialization with a 97-character vocabulary (the embedded corpus's,
padded to 128 ids): the speed does not depend on the weights. SAMPLE_BENCH_TOKENS overrides the
sample length; SAMPLE_BENCH_THREADS sets torch's CPU threads (default: torch's choice). CPU.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.tokenizer import Tokenizer  # noqa: E402
from kconfig.tree import parse_file, resolve  # noqa: E402
from kconfig.values import values  # noqa: E402
from model.gpt import GPT, ModelConfig  # noqa: E402
from train.sample import SampleConfig, generate_text, load_run  # noqa: E402

CPU = torch.device("cpu")


def model_and_sampling() -> tuple[GPT, Tokenizer, SampleConfig, str]:
    """The benchmarked model, its tokenizer and sampling settings, and a description."""
    if run := os.environ.get("SAMPLE_BENCH_RUN"):
        model, tokenizer, sample = load_run(run)
        return model, tokenizer, sample, f"run {run}"
    name = os.environ.get("SAMPLE_BENCH_DEFCONFIG", "quickstart")
    kconf, _ = resolve(parse_file(ROOT / "defconfigs" / name))
    cfg = values(kconf)
    tokenizer = Tokenizer.fit("char", "".join(map(chr, range(32, 127))) + "\n\t")
    torch.manual_seed(cfg.SEED)
    model = GPT(ModelConfig.from_config(cfg, 128))
    return model, tokenizer, SampleConfig.from_config(cfg), f"defconfigs/{name}, random init"


def timed(model, tokenizer, sample: SampleConfig, repeats: int) -> tuple[float, float, str, str]:
    """Median seconds of the sample with the cache and recomputing, and both texts; the two
    alternate, so a load that comes and goes on a shared machine slows both alike."""
    seconds: dict[bool, list[float]] = {True: [], False: []}
    texts = {}
    for _ in range(repeats):
        for use_cache in (True, False):
            t0 = time.perf_counter()
            texts[use_cache] = generate_text(model, tokenizer, sample, CPU, use_cache=use_cache)
            seconds[use_cache].append(time.perf_counter() - t0)
    return statistics.median(seconds[True]), statistics.median(seconds[False]), texts[True], texts[False]


def main() -> int:
    if threads := os.environ.get("SAMPLE_BENCH_THREADS"):
        torch.set_num_threads(int(threads))
    model, tokenizer, sample, what = model_and_sampling()
    repeats = int(os.environ.get("SAMPLE_BENCH_REPEATS", "3"))
    if tokens := os.environ.get("SAMPLE_BENCH_TOKENS"):
        sample = dataclasses.replace(sample, tokens=int(tokens))
    block = model.config.block_size
    prompt_tokens = len(tokenizer.encode(sample.prompt or "\n"))
    c = model.config
    print(f"bench: {what}: {model.num_params():,} parameters, {c.n_layer} layers, n_embd {c.n_embd}, "
          f"BLOCK_SIZE {block}, prompt {sample.prompt or chr(10)!r} ({prompt_tokens} tokens), "
          f"{torch.get_num_threads()} threads; median of {repeats}")
    cases = [("SAMPLE_TOKENS", sample)]
    if prompt_tokens + sample.tokens > block > prompt_tokens:
        cases.append(("one context", dataclasses.replace(sample, tokens=block - prompt_tokens)))
    for label, case in cases:
        cached, plain, text_cached, text_plain = timed(model, tokenizer, case, repeats)
        # A stop string can end a sample early: count the tokens generated, not the ones asked for.
        made = len(tokenizer.encode(text_cached)) - prompt_tokens if case.stop else case.tokens
        print(f"bench: {label:>13} ({made} tokens): KV cache {made / cached:,.0f} tokens/s, "
              f"recomputing {made / plain:,.0f} tokens/s, speedup {plain / cached:.2f}x; "
              f"same text: {'yes' if text_cached == text_plain else 'NO'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
