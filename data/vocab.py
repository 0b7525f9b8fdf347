"""The configured tokenizer: built once per corpus and settings, stored with its SHA-256.

Char vocabularies are the corpus's distinct characters (one streaming pass);
SentencePiece models train on the first SENTENCEPIECE_SAMPLE_MB of the corpus,
never beyond its training part. Both are kept under DATA_CACHE_DIR/tokenizers
as <name>.json plus <name>.sha256, verified on every load, so prepared data
can be checked against the tokenizer the configuration means today.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data.corpus import DataError, Source
from data.progress import Progress
from data.sources import Stats
from data.tokenizer import Tokenizer, _codepoints

FORMAT = 1


def tokenizer_settings(cfg) -> dict:
    """What, besides the corpus, determines the tokenizer (part of cache keys)."""
    if cfg.TOKENIZER_BYTE:
        return {"kind": "byte"}
    if cfg.TOKENIZER_SENTENCEPIECE:
        return {"kind": "sentencepiece", "model_type": "unigram" if cfg.SENTENCEPIECE_UNIGRAM else "bpe",
                "vocab_size": cfg.SENTENCEPIECE_VOCAB_SIZE, "sample_mb": cfg.SENTENCEPIECE_SAMPLE_MB,
                "val_fraction": cfg.VAL_FRACTION}
    return {"kind": "char"}


def configured_tokenizer(cfg, source: Source, cache: Path, log=print) -> Tokenizer:
    """The tokenizer for ``cfg`` and ``source``: loaded from the cache, else built and stored."""
    settings = tokenizer_settings(cfg)
    if settings["kind"] == "byte":
        return Tokenizer({"kind": "byte"})
    key = hashlib.sha256(f"{FORMAT}|{source.fingerprint}|{json.dumps(settings, sort_keys=True)}".encode())
    path = cache / "tokenizers" / f"{source.label}-{settings['kind']}-{key.hexdigest()[:12]}.json"
    if path.exists():
        return load_verified(path)
    log(f"data: building the {settings['kind']} tokenizer for {source.description} -> {path}")
    if settings["kind"] == "char":
        tok = _fit_chars(source, log)
    else:
        tok = _train_sentencepiece(source, settings, log)
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


def _fit_chars(source: Source, log) -> Tokenizer:
    seen = np.zeros(0, dtype=np.uint32)
    progress = Progress(source.size_bytes, "char vocabulary", log)
    stats, pending, docs = Stats(), [], 0
    for piece in source.pieces(stats):
        progress.update(piece.consumed)
        pending.append(piece.text)
        if sum(map(len, pending)) > 1 << 22:
            seen = np.union1d(seen, np.unique(_codepoints("".join(pending))))
            pending = []
    progress.close()
    seen = np.union1d(seen, np.unique(_codepoints("".join(pending))))
    if stats.documents > 1:
        seen = np.union1d(seen, np.unique(_codepoints("\n")))  # the separator between documents
    if not len(seen):
        raise DataError(f"{source.description}: the corpus is empty; point CONFIG_DATA_PATH at some text")
    return Tokenizer.from_chars(seen)


def _train_sentencepiece(source: Source, settings: dict, log) -> Tokenizer:
    from data.sentencepiece_tokenizer import sample_lines, train_sentencepiece

    cap = settings["sample_mb"] * 1_000_000
    texts, size, stats = [], 0, Stats()
    for piece in source.pieces(stats):
        if piece.text:
            texts.append(piece.text)
            size += len(piece.text.encode("utf-8"))
            if size >= cap:
                break
    else:  # the whole corpus fits in the cap: keep to its training part (by bytes, close to by tokens)
        keep = int(size * (1 - settings["val_fraction"]))
        texts = [b"".join(t.encode("utf-8") for t in texts)[:keep].decode("utf-8", errors="ignore")]
    if not any(texts):
        raise DataError(f"{source.description}: the corpus is empty; point CONFIG_DATA_PATH at some text")
    log(f"data: training SentencePiece ({settings['model_type']}, vocab {settings['vocab_size']}) "
        f"on {min(size, cap) / 1e6:.1f} MB")
    try:
        spec = train_sentencepiece(sample_lines(texts), settings["vocab_size"], settings["model_type"],
                                   threads=os.cpu_count() or 1)
    except RuntimeError as e:
        raise DataError(f"{source.description}: SentencePiece training failed ({e}); use a smaller "
                        "CONFIG_SENTENCEPIECE_VOCAB_SIZE or more text") from None
    return Tokenizer(spec)
