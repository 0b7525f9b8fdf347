"""Tokenize a source into train.bin/val.bin in bounded memory.

Pieces of text are grouped into batches of about BATCH_CHARS, tokenized (in
worker processes, one per core, for a corpus where that pays off) and appended
in order to one token file, so memory holds a few batches, never the corpus.
A batch's documents are encoded together by data/batch_encode.py (each distinct
word once per process; the ids of encoding each document alone, which
``encode_batch_reference``, the document-by-document path, gives). The last
VAL_FRACTION of the tokens is then copied to val.bin and the file truncated to
train.bin: the same deterministic split as tokenizing the whole text at once.
Token counts for the unigram entropy and the files' SHA-256 are computed on the
way, chunk by chunk.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data.batch_encode import BatchEncoder
from data.corpus import DOC_SEPARATOR, Source, empty_corpus_error
from data.progress import Progress
from data.sources import Stats
from data.tokenizer import Tokenizer

BATCH_CHARS = 4 << 20
COPY_TOKENS = 8 << 20
PARALLEL_MIN_BYTES = 8 << 20  # below this (two batches), starting worker processes costs more than it saves
REFERENCE_PARALLEL_MIN_BYTES = 32 << 20  # the document-by-document path's threshold


def _write(f, arr: np.ndarray) -> None:
    """Append ``arr`` to the open token file (one place, so tests can simulate a full disk)."""
    f.write(memoryview(arr))


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def _batches(source: Source, eos_id: int | None, stats: Stats, progress: Progress):
    """Lists of segments (str, or None for an end-of-sequence token) of about BATCH_CHARS."""
    batch, size, started, in_doc = [], 0, False, False
    for piece in source.pieces(stats):
        progress.update(piece.consumed)
        if piece.text:
            if not in_doc and eos_id is None and started:
                batch.append(DOC_SEPARATOR)
            batch.append(piece.text)
            size += len(piece.text)
            started = in_doc = True
        if piece.doc_end and in_doc:
            if eos_id is not None:
                batch.append(None)
            in_doc = False
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if in_doc and eos_id is not None:
        batch.append(None)
    if batch:
        yield batch


def _runs(batch: list) -> tuple[list[str], list[bool]]:
    """The texts a batch encodes apart (its segments between end-of-sequence marks, joined) and
    whether an end-of-sequence token follows each."""
    texts, eos, text = [], [], []
    for seg in batch:
        if seg is None:
            texts.append("".join(text))
            eos.append(True)
            text = []
        else:
            text.append(seg)
    if text:
        texts.append("".join(text))
        eos.append(False)
    return texts, eos


def encode_batch(batch: list, encoder: BatchEncoder) -> np.ndarray:
    """A batch's token ids: its texts encoded together, each end of sequence its id."""
    tok = encoder.tok
    texts, eos = _runs(batch)
    ids, lengths = encoder.encode_texts(texts)
    if any(eos):
        ids = np.insert(ids, np.cumsum(lengths)[np.array(eos)], tok.eos_id)
    return ids.astype(dtype_for(tok.vocab_size), copy=False)


def encode_batch_reference(batch: list, tok: Tokenizer) -> np.ndarray:
    """The same ids as ``encode_batch``, document by document through ``Tokenizer.encode_array``
    (the path before data/batch_encode.py: the tests' oracle and the old side of data/bench.py)."""
    dtype = dtype_for(tok.vocab_size)
    parts, text = [], []
    for seg in batch:
        if seg is None:
            if text:
                parts.append(tok.encode_array("".join(text), dtype))
            parts.append(np.array([tok.eos_id], dtype=dtype))
            text = []
        else:
            text.append(seg)
    if text:
        parts.append(tok.encode_array("".join(text), dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


_worker_encode = None  # a worker process's batch encoder (built once per process by _init_worker)


def _init_worker(spec: dict, reference: bool) -> None:
    global _worker_encode
    # one process per core: the BPE library's own threads would only compete (and it warns after a fork)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(spec)
    if reference:
        _worker_encode = functools.partial(encode_batch_reference, tok=tok)
    else:
        _worker_encode = functools.partial(encode_batch, encoder=BatchEncoder(tok, threads=False))


def _encode_in_worker(batch: list) -> np.ndarray:
    return _worker_encode(batch)


def workers_for(tok: Tokenizer, source_bytes: int, reference: bool = False) -> int:
    """Worker processes for tokenizing: one per core (up to 8) for SentencePiece and BPE from
    PARALLEL_MIN_BYTES on; none for bytes and (batch encoding's lookup table keeps up with reading)
    chars. ``reference``: the rule before batch encoding (chars like the subword kinds, from 32 MB)."""
    if tok.kind == "byte" or (tok.kind == "char" and not reference):
        return 1
    if source_bytes < (REFERENCE_PARALLEL_MIN_BYTES if reference else PARALLEL_MIN_BYTES):
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def tokenize_to(source: Source, tok: Tokenizer, val_fraction: float, folder: Path, log,
                reference: bool = False) -> dict:
    """Write folder/train.bin and folder/val.bin; return counts, digests, entropy and skip stats.

    ``reference``: encode document by document (``encode_batch_reference``), for comparisons."""
    dtype = dtype_for(tok.vocab_size)
    total_bytes = source.size_bytes
    workers = workers_for(tok, total_bytes, reference)
    stats, counts, n = Stats(), np.zeros(tok.vocab_size, dtype=np.int64), 0
    progress = Progress(total_bytes, f"tokenizing ({workers} process{'es' if workers > 1 else ''})", log)
    all_path = folder / "train.bin"
    try:
        with open(all_path, "wb") as f:
            def take(arr):
                nonlocal n
                _write(f, arr)
                counts[:] += np.bincount(arr, minlength=tok.vocab_size)
                n += len(arr)
            if workers == 1:
                encode = functools.partial(encode_batch_reference, tok=tok) if reference else \
                    functools.partial(encode_batch, encoder=BatchEncoder(tok))
                for batch in _batches(source, tok.eos_id, stats, progress):
                    take(encode(batch))
            else:
                with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tok.spec, reference)) as pool:
                    pending = deque()
                    for batch in _batches(source, tok.eos_id, stats, progress):
                        pending.append(pool.submit(_encode_in_worker, batch))
                        if len(pending) >= 2 * workers:  # bounded: the reader waits for the tokenizers
                            take(pending.popleft().result())
                    while pending:
                        take(pending.popleft().result())
    finally:
        progress.close()
    if n == 0:
        raise empty_corpus_error(source, stats)
    n_val = max(1, int(n * val_fraction))
    n_train = n - n_val
    itemsize = np.dtype(dtype).itemsize
    val_hash = hashlib.sha256()
    tokens = np.memmap(all_path, dtype=dtype, mode="r", shape=(n,))
    with open(folder / "val.bin", "wb") as f:
        for start in range(n_train, n, COPY_TOKENS):
            chunk = np.array(tokens[start:min(n, start + COPY_TOKENS)])
            _write(f, chunk)
            val_hash.update(chunk.tobytes())
            counts[:] -= np.bincount(chunk, minlength=tok.vocab_size)
    del tokens
    os.truncate(all_path, n_train * itemsize)
    return {"dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
            "sha256": {"train.bin": file_sha256(all_path), "val.bin": val_hash.hexdigest()},
            "unigram_entropy_nats": entropy_of_counts(counts), "documents": stats.documents,
            "text_bytes": stats.text_bytes, "workers": workers,
            "skipped": {**stats.as_dict(), "binary_files": len(source.binary_skipped)}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def entropy_of_counts(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / max(1.0, counts.sum())
    return float(-(p * np.log(p)).sum())


def unigram_entropy(ids: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best model that ignores context."""
    return entropy_of_counts(np.bincount(ids, minlength=vocab_size))
