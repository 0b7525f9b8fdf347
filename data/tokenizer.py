"""Character, byte, SentencePiece and byte-level BPE tokenizers, defined by a JSON-serializable spec.

The spec is everything needed to rebuild a tokenizer (a SentencePiece model is
carried base64-encoded, a BPE tokenizer as its native tokenizer.json), so a
checkpoint that stores ``tokenizer.spec`` can sample without the data cache.
``sha256`` is the digest of the canonical spec.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json

import numpy as np

from data.bpe_tokenizer import END_OF_TEXT, native, safe_chunks
from data.errors import DataError


class Tokenizer:
    """Maps text to token ids and back. ``spec`` is the JSON-serializable definition."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.kind = spec["kind"]
        self.eos_id: int | None = None
        if self.kind == "char":
            self.chars = spec["chars"]
            self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
            self._index = {c: i for i, c in enumerate(self.chars)}
        elif self.kind == "sentencepiece":
            import sentencepiece as spm

            proto = base64.b64decode(spec["model"])
            if "model_sha256" in spec and hashlib.sha256(proto).hexdigest() != spec["model_sha256"]:
                raise ValueError("SentencePiece model in the tokenizer spec does not match its model_sha256")
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
            self.eos_id = self._sp.eos_id()
        elif self.kind == "bpe":
            self._bpe = native(spec)
            self.eos_id = self._bpe.token_to_id(END_OF_TEXT)
        elif self.kind != "byte":
            raise ValueError(f"unknown tokenizer kind {self.kind!r} in tokenizer spec")

    @classmethod
    def fit(cls, kind: str, text: str) -> "Tokenizer":
        """A tokenizer for ``text``: char vocab = its sorted distinct characters."""
        if kind == "byte":
            return cls({"kind": "byte"})
        if kind != "char":
            raise ValueError(f"Tokenizer.fit makes char or byte tokenizers, not {kind!r}")
        return cls.from_chars(np.unique(codepoints(text)))

    @classmethod
    def from_chars(cls, points) -> "Tokenizer":
        return cls({"kind": "char", "chars": [chr(c) for c in sorted(int(c) for c in points)]})

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._sp.get_piece_size()
        if self.kind == "bpe":
            return self._bpe.get_vocab_size()
        return len(self.chars) if self.kind == "char" else 256

    @property
    def sha256(self) -> str:
        blob = json.dumps(self.spec, sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def encode_array(self, text: str, dtype=np.int64) -> np.ndarray:
        """Token ids of ``text`` as a ``dtype`` array (vectorized; no per-character Python loop)."""
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
        if self.kind == "sentencepiece":
            # Line by line: long inputs encode several times faster, with identical ids ("\n" is its own piece).
            lines = self._sp.encode(text.splitlines(keepends=True))
            return np.fromiter((i for ids in lines for i in ids), dtype=dtype)
        if self.kind == "bpe":
            # chunks encode on several threads; they are cut where the ids stay those of the whole text
            encodings = self._bpe.encode_batch_fast(list(safe_chunks(text)), add_special_tokens=False)
            return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype)
        cps = codepoints(text)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self._codepoints) - 1)
        unknown = self._codepoints[ids] != cps
        if unknown.any():
            bad = sorted({chr(c) for c in cps[unknown]})[:10]
            raise ValueError(f"characters not in the char vocabulary: {bad!r}")
        return ids.astype(dtype)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if self.kind == "sentencepiece":
            return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])
        if self.kind == "bpe":  # end-of-text tokens decode to nothing, like SentencePiece's eos
            return self._bpe.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.spec, f, ensure_ascii=True)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


def check_vocab_fits(tokenizer: Tokenizer, embedding_rows: int, where: str) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has ids (e.g. an old checkpoint)."""
    if tokenizer.vocab_size > embedding_rows:
        raise DataError(f"{where}: the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                        f"embedding has only {embedding_rows} rows; train a new model for this tokenizer "
                        "(or use the tokenizer the checkpoint was trained with)")


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a uint32 array."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
