"""Character- and byte-level tokenizers, stored as JSON next to the prepared data."""

from __future__ import annotations

import hashlib
import json

import numpy as np


class Tokenizer:
    """Maps text to token ids and back. ``spec`` is the JSON-serializable definition."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.kind = spec["kind"]
        if self.kind == "char":
            self.chars = spec["chars"]
            self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
            self._index = {c: i for i, c in enumerate(self.chars)}
        elif self.kind != "byte":
            raise ValueError(f"unknown tokenizer kind {self.kind!r} in tokenizer spec")

    @classmethod
    def fit(cls, kind: str, text: str) -> "Tokenizer":
        """A tokenizer for ``text``: char vocab = its sorted distinct characters."""
        if kind == "byte":
            return cls({"kind": "byte"})
        codepoints = np.unique(_codepoints(text))
        return cls({"kind": "char", "chars": [chr(c) for c in codepoints]})

    @property
    def vocab_size(self) -> int:
        return len(self.chars) if self.kind == "char" else 256

    @property
    def sha256(self) -> str:
        blob = json.dumps(self.spec, sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int64 array (vectorized; no per-character Python loop)."""
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        cps = _codepoints(text)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self._codepoints) - 1)
        unknown = self._codepoints[ids] != cps
        if unknown.any():
            bad = sorted({chr(c) for c in cps[unknown]})[:10]
            raise ValueError(f"characters not in the char vocabulary: {bad!r}")
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.spec, f, ensure_ascii=True)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
