"""The configured tokenizer: built once per corpus and settings, stored with its SHA-256.

Char vocabularies are the corpus's distinct characters (one streaming pass);
SentencePiece and byte-level BPE models train on the first SENTENCEPIECE_SAMPLE_MB
or BPE_SAMPLE_MB of the corpus, never beyond its training part. All are kept
under DATA_CACHE_DIR/tokenizers as <name>.json plus <name>.sha256, verified on
every load, so prepared data can be checked against the tokenizer the
configuration means today.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data.bpe_tokenizer import train_bpe
from data.corpus import Source, empty_corpus_error
from data.errors import DataError
from data.progress import Progress
from data.sentencepiece_tokenizer import sample_lines, train_sentencepiece
from data.sources import Stats
from data.tokenizer import Tokenizer, codepoints

FORMAT = 1


def tokenizer_settings(cfg) -> dict:
    """What, besides the corpus, determines the tokenizer (part of cache keys)."""
    if cfg.TOKENIZER == "sentencepiece":
        return {"kind": "sentencepiece", "model_type": cfg.SENTENCEPIECE_MODEL_TYPE,
                "vocab_size": cfg.SENTENCEPIECE_VOCAB_SIZE, "sample_mb": cfg.SENTENCEPIECE_SAMPLE_MB,
                "val_fraction": cfg.VAL_FRACTION}
    if cfg.TOKENIZER == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.BPE_VOCAB_SIZE, "sample_mb": cfg.BPE_SAMPLE_MB,
                "val_fraction": cfg.VAL_FRACTION}
    return {"kind": cfg.TOKENIZER}  # "char" or "byte": nothing else determines them


def configured_tokenizer(cfg, source: Source, cache: Path, log=print) -> Tokenizer:
    """The tokenizer for ``cfg`` and ``source``: loaded from the cache, else built and stored."""
    settings = tokenizer_settings(cfg)
    if settings["kind"] == "byte":
        return Tokenizer({"kind": "byte"})
    key = hashlib.sha256(f"{FORMAT}|{source.fingerprint}|{json.dumps(settings, sort_keys=True)}".encode())
    path = cache / "tokenizers" / f"{source.label}-{settings['kind']}-{key.hexdigest()[:12]}.json"
    build = (lambda: _fit_chars(source, log)) if settings["kind"] == "char" else \
        (lambda: _train_subwords(source, settings, log))
    return _stored_or_built(path, f"{settings['kind']} tokenizer for {source.description}", build, log)


def _stored_or_built(path: Path, what: str, build, log) -> Tokenizer:
    """The tokenizer stored at ``path`` (SHA verified), or ``build()`` it and store it with its SHA."""
    if path.exists():
        return load_verified(path)
    log(f"data: building the {what} -> {path}")
    tok = build()
    _store(tok, path)
    log(f"data: tokenizer {tok.kind}, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}")
    return tok


def load_verified(path: Path) -> Tokenizer:
    """A stored tokenizer whose spec still matches its recorded SHA-256."""
    sha_path = path.with_suffix(".sha256")
    try:
        tok = Tokenizer.load(path)
        recorded = sha_path.read_text().split()[0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"{path}: unreadable stored tokenizer ({e}); delete it and {sha_path.name} to rebuild it") from None
    if tok.sha256 != recorded:
        raise DataError(f"{path}: its SHA-256 {tok.sha256[:12]} differs from the recorded {recorded[:12]} in "
                        f"{sha_path}; the file was changed. Delete both to rebuild the tokenizer (prepared data "
                        "made with the old one will then be refused until re-prepared)")
    return tok


def _store(tok: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(tok.spec, ensure_ascii=True)),
                         (path.with_suffix(".sha256"), f"{tok.sha256}  {path.name}\n")):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def mix_tokenizer(cfg, sources: list[tuple[Source, float]], extras: list[Source], cache: Path,
                  log=print) -> Tokenizer:
    """One tokenizer shared by weighted training sources (and validation-only ``extras``).

    char: the distinct characters of every source and extra (all must encode);
    SentencePiece and BPE: trained on a sample of SENTENCEPIECE_SAMPLE_MB or BPE_SAMPLE_MB split
    across the training sources by weight (extras are validation, never trained on); byte: fixed.
    """
    settings = tokenizer_settings(cfg)
    if settings["kind"] == "byte":
        return Tokenizer({"kind": "byte"})
    covered = [s for s, _ in sources] + (list(extras) if settings["kind"] == "char" else [])
    parts = [f"{s.fingerprint}:{w!r}" for s, w in sources] + [s.fingerprint for s in covered[len(sources):]]
    key = hashlib.sha256(f"{FORMAT}|mix|{'|'.join(parts)}|{json.dumps(settings, sort_keys=True)}".encode())
    path = cache / "tokenizers" / f"mix-{settings['kind']}-{key.hexdigest()[:12]}.json"
    build = (lambda: _fit_chars(covered, log, "the sources of CONFIG_DATA_MIX/CONFIG_DATA_VAL_EXTRA")) \
        if settings["kind"] == "char" else (lambda: _train_subwords(sources, settings, log))
    return _stored_or_built(path, f"{settings['kind']} tokenizer for {len(covered)} sources", build, log)


def _fit_chars(sources, log, description: str = "") -> Tokenizer:
    """The distinct characters of ``sources`` (a Source or a list of them), in one streaming pass."""
    sources = [sources] if isinstance(sources, Source) else list(sources)
    seen = np.zeros(0, dtype=np.uint32)
    progress = Progress(sum(s.size_bytes for s in sources), "char vocabulary", log)
    pending, many_docs, skipped = [], False, Stats()
    for source in sources:
        stats = Stats()
        for piece in source.pieces(stats):
            progress.update(piece.consumed)
            pending.append(piece.text)
            if sum(map(len, pending)) > 1 << 22:
                seen = np.union1d(seen, np.unique(codepoints("".join(pending))))
                pending = []
        many_docs = many_docs or stats.documents > 1
        skipped.add(stats)
    progress.close()
    seen = np.union1d(seen, np.unique(codepoints("".join(pending))))
    if many_docs:
        seen = np.union1d(seen, np.unique(codepoints("\n")))  # the separator between documents
    if not len(seen):
        raise empty_corpus_error(sources, skipped, description)
    return Tokenizer.from_chars(seen)


def _sample(source: Source, cap: int, val_fraction: float, stats: Stats) -> tuple[list[str], int]:
    """The first ``cap`` bytes of ``source``; all of it but its validation part when it is smaller."""
    texts, size = [], 0
    for piece in source.pieces(stats):
        if piece.text:
            # a document's end is a line break for SentencePiece: documents never merge into one sentence
            texts.append(piece.text + ("\n" if piece.doc_end else ""))
            size += len(piece.text.encode("utf-8"))
            if size >= cap:
                break
    else:  # the whole corpus fits in the cap: keep to its training part (by bytes, close to by tokens)
        keep = int(size * (1 - val_fraction))
        texts = [b"".join(t.encode("utf-8") for t in texts)[:keep].decode("utf-8", errors="ignore")]
    return texts, min(size, cap)


def _train_subwords(sources, settings: dict, log) -> Tokenizer:
    """Train SentencePiece or BPE on their SAMPLE_MB of text: from one Source, or split by weight over
    (Source, weight) pairs."""
    weighted = [(sources, 1.0)] if isinstance(sources, Source) else list(sources)
    cap = settings["sample_mb"] * 1_000_000
    total = sum(w for _, w in weighted)
    texts, size, stats = [], 0, Stats()
    for source, weight in weighted:
        got, n = _sample(source, cap if len(weighted) == 1 else max(1, int(cap * weight / total)),
                         settings["val_fraction"], stats)
        texts += got
        size += n
    description = weighted[0][0].description if len(weighted) == 1 else "the sources of CONFIG_DATA_MIX"
    if not any(texts):
        raise empty_corpus_error([s for s, _ in weighted], stats, "" if len(weighted) == 1 else description)
    if settings["kind"] == "bpe":
        log(f"data: training byte-level BPE (vocab {settings['vocab_size']}) on {size / 1e6:.1f} MB")
        return Tokenizer(train_bpe(texts, settings["vocab_size"]))
    log(f"data: training SentencePiece ({settings['model_type']}, vocab {settings['vocab_size']}) "
        f"on {size / 1e6:.1f} MB")
    try:
        spec = train_sentencepiece(sample_lines(texts), settings["vocab_size"], settings["model_type"],
                                   threads=os.cpu_count() or 1)
    except RuntimeError as e:
        raise DataError(f"{description}: SentencePiece training failed ({e}); use a smaller "
                        "CONFIG_SENTENCEPIECE_VOCAB_SIZE or more text") from None
    return Tokenizer(spec)
