"""Tokenize a corpus once into memmap-able token files with a manifest.

Layout of a prepared dataset (under DATA_CACHE_DIR/<label>-<tokenizer>-<key>/):
train.bin and val.bin (uint16 ids, uint32 when the vocabulary exceeds 65535),
tokenizer.json, manifest.json. Everything is written into a temporary folder
that is renamed into place at the end, so an interrupted preparation never
leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.corpus import Source, source_for
from data.tokenizer import Tokenizer

FORMAT = 1


@dataclass(frozen=True)
class PreparedData:
    path: Path
    manifest: dict

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer.json")

    @property
    def dtype(self):
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")


def tokenizer_kind(cfg) -> str:
    return "byte" if cfg.TOKENIZER_BYTE else "char"


def prepare(cfg, root: Path, log=print) -> PreparedData:
    """Prepared data for ``cfg``, reusing an up-to-date copy when one exists."""
    source = source_for(cfg, root)
    kind = tokenizer_kind(cfg)
    key = hashlib.sha256(f"{FORMAT}|{source.fingerprint}|{kind}|{cfg.VAL_FRACTION!r}".encode()).hexdigest()[:12]
    cache = Path(cfg.DATA_CACHE_DIR)
    cache = cache if cache.is_absolute() else root / cache
    out = cache / f"{source.label}-{kind}-{key}"
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        return PreparedData(out, json.loads(manifest_path.read_text()))
    log(f"data: preparing {source.description} with the {kind} tokenizer -> {out}")
    t0 = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache))
    try:
        manifest = _write(source, kind, cfg.VAL_FRACTION, tmp)
        if out.exists():  # a stale, manifest-less leftover from an older layout
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"data: {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens, "
        f"vocab {manifest['tokenizer']['vocab_size']}, in {time.time() - t0:.1f}s")
    return PreparedData(out, manifest)


def _write(source: Source, kind: str, val_fraction: float, folder: Path) -> dict:
    text = source.read_text()
    if not text:
        raise ValueError(f"{source.description}: the corpus is empty")
    tok = Tokenizer.fit(kind, text)
    ids = tok.encode_array(text)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    n_val = max(1, int(len(ids) * val_fraction))
    splits = {"train": ids[:-n_val].astype(dtype), "val": ids[-n_val:].astype(dtype)}
    tok.save(folder / "tokenizer.json")
    digests = {}
    for name, arr in splits.items():
        arr.tofile(folder / f"{name}.bin")
        digests[f"{name}.bin"] = hashlib.sha256(arr.tobytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "source": {"description": source.description, "label": source.label,
                   "files": len(source.files), "fingerprint": source.fingerprint,
                   "bytes": len(text.encode("utf-8"))},
        "tokenizer": {"kind": kind, "vocab_size": tok.vocab_size, "sha256": tok.sha256},
        "dtype": np.dtype(dtype).name,
        "val_fraction": val_fraction,
        "train_tokens": int(len(splits["train"])),
        "val_tokens": int(len(splits["val"])),
        "sha256": digests,
        "unigram_entropy_nats": unigram_entropy(splits["train"], tok.vocab_size),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unigram_entropy(ids: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best model that ignores context."""
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
