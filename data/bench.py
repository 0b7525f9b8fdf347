"""Tokenizing throughput and peak memory, the document-by-document path against batch encoding.

    python -m data.bench

For each tokenizer (DATA_BENCH_TOKENIZER, default char,byte,sentencepiece,bpe; vocabulary
DATA_BENCH_VOCAB, default 8192, for the subword ones, trained once on the corpus first) it
prepares the same corpus with the old path (``stream.encode_batch_reference``: each document
through ``Tokenizer.encode_array``) and the new one (``stream.encode_batch``: data/batch_encode.py)
in turn, old, new, old, new... (DATA_BENCH_REPEATS times each, default 3), and prints the median
MB/s of each, their ratio, MB per CPU-second (the preparing process's and its workers' CPU time:
what a core does, less sensitive to other jobs than the wall time), the peak resident memory of
each (the preparing process and its largest worker), the worker processes and whether the two
wrote the same token files (SHA-256). Each preparation runs in a fresh process (spawned, so the
memory is its own, not this one's); the time is tokenize_to's alone: reading, encoding, writing
and hashing the token files, with the tokenizer already built.

The corpus (DATA_BENCH_SOURCE): "embedded" (default: the Python standard library source, about
10 MB, capped at DATA_BENCH_MB), "generated" (DATA_BENCH_MB of English-like text, default 40:
words of a 60,000-word vocabulary drawn with Zipf frequencies, sentences and paragraphs, some
accented and CJK words, in 20 files), or a file or folder (capped at DATA_BENCH_MB).
Timing on a shared machine varies: the old and new runs alternate so that load hits both alike.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUBWORD_VOCAB = 8192
SYLLABLES = ("ka ri to na ne mo su shi la pe ar en th er on an re in ed st ou ng al it is or es ti le de ve "
             "co ra ma li ro se ta ce ge be di pro con com ex per ate ion ment ness ly ing").split()
ACCENTED = ["café", "naïve", "über", "señor", "façade", "Ærø", "東京", "北京", "Москва", "αβγ",
            "emoji👍"]


def generate(folder: Path, megabytes: int, files: int = 20) -> None:
    """English-like text: Zipf-distributed words (exponent 1.1) of a 60,000-word vocabulary."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5, 60_000)
    vocab = ["".join(rng.choice(SYLLABLES, n)) for n in lengths]
    vocab[200:200 + len(ACCENTED) * 50:50] = ACCENTED  # among the frequent words, none the most
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    words = np.array(vocab, dtype=object)
    per_file = megabytes * 1_000_000 // files
    ends = np.array([". ", ", ", "? ", ".\n\n"], dtype=object)
    for i in range(files):
        parts, size = [], 0
        while size < per_file:
            drawn = words[rng.choice(len(vocab), 200_000, p=weights)]  # about 1.5 MB of words at a time
            cuts = np.cumsum(rng.integers(4, 30, 20_000))
            cuts = cuts[cuts < len(drawn)]
            marks = ends[rng.choice(len(ends), len(cuts) + 1, p=[0.7, 0.1, 0.05, 0.15])]
            for sentence, mark in zip(np.split(drawn, cuts), marks):
                text = " ".join(sentence).capitalize() + mark
                parts.append(text)
                size += len(text)
        (folder / f"part{i:02d}.txt").write_text("".join(parts)[:per_file])


def _config(corpus: str, kind: str, cache: Path):
    from kconfig.tree import parse_overrides, resolve
    from kconfig.values import values

    size = int(os.environ.get("DATA_BENCH_VOCAB", str(SUBWORD_VOCAB)))
    vocab = {"sentencepiece": f"SENTENCEPIECE_VOCAB_SIZE={size}", "bpe": f"BPE_VOCAB_SIZE={size}"}
    sets = f"{corpus} DATA_CACHE_DIR={cache} TOKENIZER_{kind.upper()}=y VAL_FRACTION=0.01 {vocab.get(kind, '')}"
    return values(resolve([], parse_overrides(sets))[0])


def _child(conn, corpus: str, kind: str, tmp: Path, reference: bool | None) -> None:
    """In a fresh process: train the tokenizer (reference None) or prepare with one path; send the figures."""
    from data.corpus import rooted
    from data.dataset import source_for
    from data.stream import tokenize_to
    from data.vocab import configured_tokenizer

    cfg = _config(corpus, kind, tmp / "cache")
    source = source_for(cfg, tmp)
    t0 = time.perf_counter()
    tok = configured_tokenizer(cfg, source, rooted(cfg.DATA_CACHE_DIR, tmp), lambda m: None)
    if reference is None:
        conn.send({"seconds": time.perf_counter() - t0, "vocab": tok.vocab_size})
        return
    out = Path(tempfile.mkdtemp(dir=tmp))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    result = tokenize_to(source, tok, cfg.VAL_FRACTION, out, lambda m: None, reference=reference)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    shutil.rmtree(out)
    kib = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    conn.send({"seconds": seconds, "cpu": cpu, "bytes": result["text_bytes"], "workers": result["workers"],
               "tokens": result["train_tokens"] + result["val_tokens"], "sha256": result["sha256"],
               "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6,
               "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1e6})


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers (user and system)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _in_fresh_process(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, *args))
    p.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    p.join()
    if result is None:
        raise SystemExit(f"bench: the {args[1]} measurement process failed (exit code {p.exitcode})")
    return result


def bench(corpus: str, kind: str, tmp: Path, repeats: int) -> None:
    trained = _in_fresh_process(corpus, kind, tmp, None)
    runs = {True: [], False: []}
    for _ in range(repeats):
        for reference in (True, False):
            runs[reference].append(_in_fresh_process(corpus, kind, tmp, reference))
    old, new = runs[True], runs[False]
    mb = old[0]["bytes"] / 1e6
    rate = {k: statistics.median(mb / r["seconds"] for r in v) for k, v in (("old", old), ("new", new))}
    per_cpu = {k: statistics.median(mb / r["cpu"] for r in v) for k, v in (("old", old), ("new", new))}
    same = all(r["sha256"] == old[0]["sha256"] for r in old + new)
    memory = {k: f"{max(r['rss'] for r in v):.0f}" + (f" + {max(r['worker_rss'] for r in v):.0f}/worker"
                                                        if v[0]["workers"] > 1 else "")
              for k, v in (("old", old), ("new", new))}
    print(f"| {kind} | {trained['vocab']} | {trained['seconds']:.1f} s | {mb * 1e6 / old[0]['tokens']:.2f} | "
          f"{rate['old']:.1f} | {rate['new']:.1f} | {rate['new'] / rate['old']:.1f}x | "
          f"{per_cpu['old']:.1f} / {per_cpu['new']:.1f} | {memory['old']} | "
          f"{memory['new']} | {old[0]['workers']} / {new[0]['workers']} | {'yes' if same else 'NO'} |", flush=True)
    if not same:
        raise SystemExit(f"bench: the {kind} tokenizer's new path wrote different token files than the old one")


def main() -> int:
    kinds = [k.strip() for k in os.environ.get("DATA_BENCH_TOKENIZER", "char,byte,sentencepiece,bpe").split(",")]
    repeats = int(os.environ.get("DATA_BENCH_REPEATS", "3"))
    choice = os.environ.get("DATA_BENCH_SOURCE", "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        if choice == "embedded":
            megabytes = int(os.environ.get("DATA_BENCH_MB", "100"))
            corpus, what = f"EMBEDDED_CORPUS_MB={megabytes}", "the embedded corpus"
        elif choice == "generated":
            megabytes = int(os.environ.get("DATA_BENCH_MB", "40"))
            (tmp / "corpus").mkdir()
            generate(tmp / "corpus", megabytes)
            corpus, what = f"DATA_PATH={tmp / 'corpus'}", f"{megabytes} MB of generated English-like text"
        else:
            path = Path(choice).resolve()
            if not path.exists():
                raise SystemExit(f"bench: DATA_BENCH_SOURCE={choice}: no such file or folder "
                                 "(or use embedded, generated)")
            capped = _capped(path, tmp, int(os.environ.get("DATA_BENCH_MB", "0")))
            corpus, what = f"DATA_PATH={capped}", str(path)
        print(f"bench: tokenizing {what} on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); "
              f"old = document by document, new = batch encoding; median of {repeats}, old and new alternating",
              flush=True)
        print("| tokenizer | vocab | trained in | bytes/token | old MB/s | new MB/s | new/old | MB per CPU-second "
              "old / new | old peak RSS MB | new peak RSS MB | workers old / new | same ids |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for kind in kinds:
            bench(corpus, kind, tmp, repeats)
        print(f"bench: load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _capped(path: Path, tmp: Path, megabytes: int) -> Path:
    """``path`` itself, or with a cap: a folder of links to its first files (sorted) up to ``megabytes`` MB."""
    if not megabytes or path.is_file():
        return path
    folder, total = tmp / "capped", 0
    folder.mkdir()
    for i, f in enumerate(sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())):
        if total >= megabytes * 1_000_000:
            break
        (folder / f"{i:06d}{''.join(f.suffixes[-1:])}").symlink_to(f)
        total += f.stat().st_size
    return folder


if __name__ == "__main__":
    sys.exit(main())
