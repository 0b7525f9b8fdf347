"""Data preparation throughput and memory: python scripts/bench_data.py

Generates a text corpus of DATA_BENCH_MB megabytes (default 1000) as 100 files in
a temporary folder, prepares it with the byte tokenizer (or DATA_BENCH_TOKENIZER=
char|sentencepiece) and prints MB/s and the peak resident memory of this process
and its children (resource.getrusage). Preparation streams, so the peak should
stay far below the corpus size (target: under 2 GB for 1 GB).
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

from data.prepare import prepare  # noqa: E402
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


def main() -> int:
    megabytes = int(os.environ.get("DATA_BENCH_MB", "1000"))
    kind = os.environ.get("DATA_BENCH_TOKENIZER", "byte")
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        corpus = tmp / "corpus"
        corpus.mkdir()
        t0 = time.time()
        size = generate(corpus, megabytes)
        print(f"bench: generated {size / 1e6:,.0f} MB in {time.time() - t0:.0f}s; RSS so far {peak_rss_mb()[0]:.0f} MB",
              flush=True)
        kconf, _ = resolve([], parse_overrides(f"DATA_PATH={corpus} DATA_CACHE_DIR={tmp / 'cache'} "
                                               f"TOKENIZER_{kind.upper()}=y VAL_FRACTION=0.01"))
        t0 = time.time()
        data = prepare(values(kconf), tmp, log=lambda m: print(m, flush=True))
        seconds = time.time() - t0
        own, children = peak_rss_mb()
        m = data.manifest
        print(f"bench: {kind} tokenizer, {size / 1e6:,.0f} MB corpus, {m['train_tokens'] + m['val_tokens']:,} tokens "
              f"in {seconds:.1f}s = {size / 1e6 / seconds:.1f} MB/s; peak RSS {own:.0f} MB (this process), "
              f"{children:.0f} MB (largest child), {own + children:.0f} MB together")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
