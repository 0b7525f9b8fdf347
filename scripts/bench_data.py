"""Data preparation throughput and memory: python scripts/bench_data.py

Generates a text corpus of DATA_BENCH_MB megabytes (default 1000) as 100 files in
a temporary folder (or, with DATA_BENCH_SOURCE=embedded, takes that many MB of the
embedded corpus), prepares it with the byte tokenizer (or DATA_BENCH_TOKENIZER=
char|byte|sentencepiece|bpe, or several comma-separated, measured one after the
other on the same text) and prints, per tokenizer, the seconds its training took
and the tokenizing MB/s (preparation with the tokenizer already built), and the
peak resident memory of this process and its children (resource.getrusage; with
several tokenizers, the peak over all of them so far). Preparation streams, so the
peak should stay far below the corpus size (target: under 2 GB for 1 GB).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.cache import prepare_source  # noqa: E402
from data.corpus import rooted  # noqa: E402
from data.dataset import source_for  # noqa: E402
from data.vocab import configured_tokenizer  # noqa: E402
from kconfig.tree import parse_overrides, resolve  # noqa: E402
from kconfig.values import values  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
         "had one their its new after who they have not two first been other also but more all when time")


def generate(folder: Path, megabytes: int, files: int = 100) -> int:
    """Random words and line breaks, ``megabytes`` MB in ``files`` files, written file by file."""
    rng = np.random.default_rng(0)
    words = np.array(WORDS.split() + ["x\n"])
    per_file, total = megabytes * 1_000_000 // files, 0
    for i in range(files):
        parts, size = [], 0
        while size < per_file:
            text = " ".join(rng.choice(words, 200_000))
            parts.append(text)
            size += len(text)
        data = "".join(parts)[:per_file]
        (folder / f"part{i:03d}.txt").write_text(data)
        total += len(data)
    return total


def peak_rss_mb() -> tuple[float, float]:
    kib = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1e6
    return own, children


def bench(kind: str, corpus: str, tmp: Path) -> None:
    """Train (when the kind needs it) and then prepare with one tokenizer kind; print both timings."""
    kconf, _ = resolve([], parse_overrides(f"{corpus} DATA_CACHE_DIR={tmp / 'cache'} TOKENIZER_{kind.upper()}=y "
                                           "VAL_FRACTION=0.01"))
    cfg = values(kconf)
    source = source_for(cfg, tmp)
    quiet = lambda m: None  # noqa: E731
    t0 = time.time()
    tok = configured_tokenizer(cfg, source, rooted(cfg.DATA_CACHE_DIR, tmp), quiet)
    trained = time.time() - t0
    t0 = time.time()
    data = prepare_source(cfg, tmp, source, tok, quiet)
    seconds = time.time() - t0
    own, children = peak_rss_mb()
    m = data.manifest
    size, tokens = m["source"]["bytes"], m["train_tokens"] + m["val_tokens"]
    print(f"bench: {kind:>13} tokenizer (vocab {tok.vocab_size}), {size / 1e6:,.1f} MB: trained in {trained:.1f}s, "
          f"{tokens:,} tokens ({size / tokens:.2f} bytes/token) in {seconds:.1f}s = {size / 1e6 / seconds:.1f} MB/s "
          f"({m['workers']} process{'es' if m['workers'] > 1 else ''}); peak RSS {own:.0f} MB (this process), "
          f"{children:.0f} MB (largest child)", flush=True)


def main() -> int:
    megabytes = int(os.environ.get("DATA_BENCH_MB", "1000"))
    kinds = os.environ.get("DATA_BENCH_TOKENIZER", "byte").split(",")
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        if os.environ.get("DATA_BENCH_SOURCE") == "embedded":
            corpus = f"EMBEDDED_CORPUS_MB={megabytes}"
        else:
            (tmp / "corpus").mkdir()
            t0 = time.time()
            size = generate(tmp / "corpus", megabytes)
            print(f"bench: generated {size / 1e6:,.0f} MB in {time.time() - t0:.0f}s; RSS so far "
                  f"{peak_rss_mb()[0]:.0f} MB", flush=True)
            corpus = f"DATA_PATH={tmp / 'corpus'}"
        for kind in kinds:
            bench(kind.strip(), corpus, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
