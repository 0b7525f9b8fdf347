"""One source tokenized once into a cached folder of memmap-able token files with a manifest.

Layout of a prepared dataset (under DATA_CACHE_DIR/<label>-<tokenizer>-<key>/):
train.bin and val.bin (uint16 ids, uint32 when the vocabulary exceeds 65535),
tokenizer.json, manifest.json. Everything is written into a temporary folder
that is renamed into place at the end, so an interrupted preparation (or a full
disk) never leaves a folder that looks complete. The key covers the source and
the tokenizer settings; the manifest records the tokenizer's SHA-256, and data
made with a different tokenizer than the configured one is refused.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.corpus import Source, rooted
from data.errors import DataError
from data.stream import tokenize_to
from data.tokenizer import Tokenizer
from data.vocab import tokenizer_settings

FORMAT = 2


@dataclass(frozen=True)
class PreparedData:
    path: Path
    manifest: dict

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer.json")

    @property
    def dtype(self):
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    @functools.cached_property
    def val_bytes(self) -> int | None:
        """UTF-8 bytes of the text the val split's tokens stand for: the manifest's count (recorded at
        preparation), or, for data prepared before it was recorded, counted now from val.bin; None for
        a tokenizer whose byte lengths are unknown."""
        if "val_bytes" in self.manifest:
            return self.manifest["val_bytes"]
        return split_bytes(self.tokens("val"), self.tokenizer)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray | None:
    """UTF-8 bytes each token id decodes to: 1 for a byte, the character's length for a char vocabulary,
    the token's characters for byte-level BPE (each stands for one byte);
    for SentencePiece (no normalization, no dummy prefix: pieces concatenate to the text) the piece's
    length with U+2581 as a space, 1 for a byte-fallback piece, 0 for control tokens (end of text)."""
    if tok.kind == "byte":
        return np.ones(256, dtype=np.int64)
    if tok.kind == "char":
        return np.array([len(c.encode("utf-8")) for c in tok.chars], dtype=np.int64)
    if tok.kind == "bpe":  # byte-level: each character of a token stands for one byte
        from data.bpe_tokenizer import token_byte_lengths as bpe_byte_lengths

        return np.array(bpe_byte_lengths(tok.spec), dtype=np.int64)
    if tok.kind != "sentencepiece":
        return None  # a tokenizer kind whose byte lengths are not known here: bits per byte unavailable
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=base64.b64decode(tok.spec["model"]))
    return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                     else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                     for i in range(sp.get_piece_size())], dtype=np.int64)


def split_bytes(ids: np.ndarray, tok: Tokenizer, chunk: int = 8 << 20) -> int | None:
    """UTF-8 bytes of the text ``ids`` decode to, counted chunk by chunk in bounded memory (None when
    the tokenizer's byte lengths are unknown)."""
    lengths = token_byte_lengths(tok)
    if lengths is None:
        return None
    total = 0
    for start in range(0, len(ids), chunk):
        total += int(np.bincount(np.asarray(ids[start:start + chunk]), minlength=len(lengths))[:len(lengths)]
                     @ lengths)
    return total


def prepared_path(cfg, root: Path, source: Source, tokenizer_sha: str = "",
                  val_fraction: float | None = None) -> Path:
    """Where ``cfg``'s prepared data lives (whether or not it exists yet).

    A mix's sources pass the shared tokenizer's SHA (it differs from the source's own
    char or SentencePiece tokenizer) and validation-only sets pass val_fraction=1.0.
    """
    settings = tokenizer_settings(cfg)
    fraction = cfg.VAL_FRACTION if val_fraction is None else val_fraction
    text = f"{FORMAT}|{source.fingerprint}|{json.dumps(settings, sort_keys=True)}|{fraction!r}"
    if tokenizer_sha:
        text += f"|{tokenizer_sha}"
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return rooted(cfg.DATA_CACHE_DIR, root) / f"{source.label}-{settings['kind']}-{key}"


def prepare_source(cfg, root: Path, source: Source, tok: Tokenizer, log=print, shared: bool = False,
                   val_fraction: float | None = None) -> PreparedData:
    """``source`` tokenized with ``tok`` (cached, atomic); ``shared``: tok is a mix's common tokenizer."""
    out = prepared_path(cfg, root, source, tok.sha256 if shared else "", val_fraction)
    cache = out.parent
    fraction = cfg.VAL_FRACTION if val_fraction is None else val_fraction
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        _check_tokenizer(manifest, tok, out)
        return PreparedData(out, manifest)
    log(f"data: preparing {source.description} with the {tok.kind} tokenizer -> {out}")
    t0 = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # 0o777 less the umask, not mkdtemp's 0700: teammates sharing the cache can read it
    try:
        manifest = _write(source, tok, fraction, tmp, log)
        if out.exists():  # a stale, manifest-less leftover (a crash of an older version)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"{cache}: no space left on the device while preparing {source.description} "
                            f"({e.strerror}); free space or set CONFIG_DATA_CACHE_DIR to a larger disk. "
                            "Nothing was replaced: earlier prepared data is intact") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    skipped = manifest["skipped"]
    log(f"data: {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens, "
        f"{manifest['source']['documents']:,} documents, vocab {manifest['tokenizer']['vocab_size']}, "
        f"in {time.time() - t0:.1f}s")
    if skipped["non_utf8_files"] or skipped["non_utf8_records"] or skipped["binary_files"]:
        first = (f" (the first invalid UTF-8 at {skipped['non_utf8_first_at']}; CONFIG_DATA_INVALID_UTF8_REPLACE=y "
                 "keeps such text with U+FFFD)") if skipped["non_utf8_first_at"] else ""
        log(f"data: skipped {skipped['non_utf8_files']} non-UTF-8 files {skipped['non_utf8_files_first']}, "
            f"{skipped['non_utf8_records']} non-UTF-8 records and {skipped['binary_files']} binary files{first}")
    if skipped["replaced_byte_sequences"]:
        log(f"data: replaced {skipped['replaced_byte_sequences']} invalid UTF-8 byte sequences with U+FFFD")
    return PreparedData(out, manifest)


def _check_tokenizer(manifest: dict, tok: Tokenizer, out: Path) -> None:
    have = manifest.get("tokenizer", {}).get("sha256")
    if have != tok.sha256:
        raise DataError(f"{out}: prepared with a different tokenizer (sha256 {str(have)[:12]}) than the configured "
                        f"{tok.kind} tokenizer (sha256 {tok.sha256[:12]}); re-prepare it with "
                        f"`make data REPREPARE=1` (or delete {out}) and run again")


def _write(source: Source, tok: Tokenizer, val_fraction: float, folder: Path, log) -> dict:
    tok.save(folder / "tokenizer.json")
    if tok.kind == "sentencepiece":  # for other tools (spm_encode, transformers)
        (folder / "tokenizer.model").write_bytes(base64.b64decode(tok.spec["model"]))
    result = tokenize_to(source, tok, val_fraction, folder, log)
    val_ids = np.memmap(folder / "val.bin", dtype=result["dtype"], mode="r")
    val_bytes = split_bytes(val_ids, tok)  # for bits per byte; not part of the cache key
    if val_bytes is not None:  # unknown: left out, so a later version can count it from val.bin
        result["val_bytes"] = val_bytes
    del val_ids
    manifest = {
        "format": FORMAT,
        "source": {"description": source.description, "label": source.label,
                   "files": len(source.files), "fingerprint": source.fingerprint,
                   "bytes": result.pop("text_bytes"), "documents": result.pop("documents")},
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
                      "eos_id": tok.eos_id},
        "val_fraction": val_fraction,
        **result,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return manifest

