"""Character, byte, SentencePiece and byte-level BPE tokenizers, defined by a JSON-serializable spec.

The spec is everything needed to rebuild a tokenizer (a SentencePiece model is
carried base64-encoded, a BPE tokenizer as its native tokenizer.json), so a
checkpoint that stores ``tokenizer.spec`` can sample without the data cache.
``sha256`` is the digest of the canonical spec.

Added special tokens (spec key ``added``, a list of names such as ``<|im_start|>``; post-training's
chat templates add them) take the ids after the base vocabulary, in list order. Plain ``encode``
never produces them: text that spells a special token encodes as its characters (Hugging Face's
``split_special_tokens``), so the ids of every existing tokenizer are unchanged; ``encode_special``
reads the literal names as their ids (the chat-formatted text of an evaluation task). ``decode``
skips special ids (as it skips SentencePiece's and BPE's end of text); ``decode(ids, specials=True)``
writes them as their names.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re

import numpy as np

from data.bpe_tokenizer import END_OF_TEXT, native, safe_chunks
from data.errors import DataError


class Tokenizer:
    """Maps text to token ids and back. ``spec`` is the JSON-serializable definition."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.kind = spec["kind"]
        self.eos_id: int | None = None
        self.added: tuple[str, ...] = tuple(spec.get("added", ()))
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
        self.base_vocab_size = self._base_vocab_size()
        if len(set(self.added)) != len(self.added) or not all(isinstance(n, str) and n for n in self.added):
            raise ValueError(f"the tokenizer spec's added special tokens must be distinct names: {list(self.added)}")
        self._special = {name: self.base_vocab_size + i for i, name in enumerate(self.added)}
        self._special_names = {i: name for name, i in self._special.items()}
        if END_OF_TEXT in self._special and self.eos_id is None:  # char or byte given an end of text
            self.eos_id = self._special[END_OF_TEXT]

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
        """Every id: the base vocabulary, then the added special tokens."""
        return self.base_vocab_size + len(self.added)

    def _base_vocab_size(self) -> int:
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

    def special_id(self, name: str) -> int | None:
        """The id of special token ``name``: an added one, or <|endoftext|> as SentencePiece's or BPE's
        own end of text; None when the tokenizer has no such token."""
        if name in self._special:
            return self._special[name]
        return self.eos_id if name == END_OF_TEXT else None

    def encode_special(self, text: str) -> list[int]:
        """Token ids of ``text`` where the literal names of this tokenizer's special tokens (and
        <|endoftext|> when it has one) become their ids; the text between them encodes as ``encode``."""
        names = list(self.added) + ([END_OF_TEXT] if self.eos_id is not None and END_OF_TEXT not in self._special else [])
        if not names:
            return self.encode(text)
        split = re.compile("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")")
        ids: list[int] = []
        for i, piece in enumerate(split.split(text)):
            if i % 2:
                ids.append(self.special_id(piece))
            elif piece:
                ids += self.encode(piece)
        return ids

    def decode(self, ids, specials: bool = False) -> str:
        """The text of ``ids``; special tokens (added ones, end of text) are left out, or written as
        their names with ``specials``."""
        ids = [int(i) for i in ids]
        if self.added or specials:
            out, run = [], []
            for i in ids:
                name = self._special_names.get(i) or (END_OF_TEXT if specials and i == self.eos_id else None)
                if name is None:
                    run.append(i)
                    continue
                out.append(self._decode_base(run))
                run = []
                if specials:
                    out.append(name)
            return "".join(out) + self._decode_base(run)
        return self._decode_base(ids)

    def _decode_base(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.kind == "byte":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if self.kind == "sentencepiece":
            return self._sp.decode([i for i in ids if 0 <= i < self.base_vocab_size])
        if self.kind == "bpe":  # end-of-text tokens decode to nothing, like SentencePiece's eos
            return self._bpe.decode([i for i in ids if 0 <= i < self.base_vocab_size], skip_special_tokens=True)
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.spec, f, ensure_ascii=True)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


def with_special_tokens(tokenizer: Tokenizer, names) -> tuple[Tokenizer, list[str]]:
    """``tokenizer`` with the special tokens ``names`` (a chat template's), and the names it had to add.

    The tokenizer itself when it has them all: SentencePiece's and BPE's own end of text serves as
    <|endoftext|>; a char or byte tokenizer gets <|endoftext|> added. Otherwise a new tokenizer whose
    spec lists the added names after any it had (new ids after the vocabulary, a new sha256)."""
    missing = [name for name in dict.fromkeys(names) if tokenizer.special_id(name) is None]
    if not missing:
        return tokenizer, []
    return Tokenizer({**tokenizer.spec, "added": [*tokenizer.added, *missing]}), missing


def check_vocab_fits(tokenizer: Tokenizer, embedding_rows: int, where: str) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has ids (e.g. an old checkpoint)."""
    if tokenizer.vocab_size > embedding_rows:
        raise DataError(f"{where}: the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                        f"embedding has only {embedding_rows} rows; train a new model for this tokenizer "
                        "(or use the tokenizer the checkpoint was trained with)")


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a uint32 array."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
