"""Encoding many texts at once for data preparation: the ids of ``Tokenizer.encode_array``, faster.

SentencePiece and byte-level BPE spend their time on the same words over and over (a corpus
repeats its words, code its identifiers and indentation). So a text is cut into words at places
no token ever crosses, each distinct word is encoded once and remembered (``WordMemo``), and the
ids of a batch of texts are its words' remembered ids, gathered with numpy. The cuts:

- SentencePiece BPE (identity normalization, no dummy prefix, as data/sentencepiece_tokenizer.py
  trains it): a space is U+2581 to the model, and a piece holds U+2581 only as a prefix or alone
  (split_by_whitespace), so no piece crosses the start of a run of spaces after another character;
  "\\n" is a piece of its own. Checked on the vocabulary when the encoder is built (every piece), and
  the normalization on a probe. A model that fails either, and every unigram model (see
  ``BatchEncoder``), remembers whole lines instead: the unit ``encode_array`` encodes.
- byte-level BPE: the GPT-2 pre-tokenizer starts a new word at every whitespace character that
  follows a non-whitespace one (no pattern of it holds a character and then a space), and BPE
  merges within a word. Python's and the Rust regex's whitespace differ outside ASCII, so a text
  holding any such character (rare) is cut only where both agree.

The distinct words of a batch are encoded together (SentencePiece: one list; BPE: joined by
<|endoftext|>, which a tokenizer reading special tokens keeps apart, on the library's threads).
Char vocabularies use a lookup table indexed by code point; bytes are the UTF-8 bytes.
"""

from __future__ import annotations

import base64
import itertools
import re

import numpy as np

from data.bpe_tokenizer import END_OF_TEXT, native
from data.tokenizer import Tokenizer, codepoints

MEMO_WORDS = 1 << 19  # distinct words remembered; past it (or MEMO_CHARS) the memo starts over
MEMO_CHARS = 1 << 24  # characters of the words remembered (with their ids, about 100 MB at most)
MEMO_WORD_CHARS = 24  # longer words (literals, URLs, long identifiers) seldom recur: encoded, not remembered
MEMO_LINE_CHARS = 256  # the same for lines, when the memo remembers lines
BPE_GROUP = 4096  # distinct words joined into one string for the BPE library

# SentencePiece: a run of spaces (U+2581 reads as one) and the characters up to the next run, or
# "\n" alone. Besides "\n", str.splitlines (the text-by-text path) cuts after these: such texts are
# cut into lines first, so the ids stay those of that path.
_SP_WORD = re.compile("[ \u2581]*[^ \u2581\n]+|[ \u2581]+|\n")
_SP_LINE_END = re.compile("[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # one class: scanned fast
_SP_LONE_CR = re.compile("\r(?!\n)")
# BPE: whitespace and then non-whitespace. Where Python's \s is not ASCII whitespace (\x1c-\x1f,
# U+0085, U+00A0, the Unicode spaces; U+180E, a space to older Unicode tables) the two regex
# engines may disagree, and a text holding one is cut only before ASCII whitespace that follows a
# character neither takes for whitespace.
_BPE_WORD = re.compile(r"\s*\S+|\s+")
_BPE_UNSURE = re.compile("[\x1c-\x1f\x85\xa0\u1680\u180e\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_BPE_SURE_CUT = re.compile(r"(?<=[^\s\u180e])(?=[\t\n\v\f\r ])")
_SP_PROBE = "  a  b\tc \ufb01 \uff21\u2460\u2581x "  # spaces, a tab, characters NFKC would change


def sentencepiece_words(text: str) -> list[str]:
    if _SP_LINE_END.search(text) is None and ("\r" not in text or _SP_LONE_CR.search(text) is None):
        return _SP_WORD.findall(text)
    return [w for line in text.splitlines(keepends=True) for w in _SP_WORD.findall(line)]


def bpe_words(text: str) -> list[str]:
    if _BPE_UNSURE.search(text) is None:
        return _BPE_WORD.findall(text)
    return [w for w in _BPE_SURE_CUT.split(text) if w]


def sentencepiece_cuts_hold(sp) -> bool:
    """Whether ``sp`` encodes a text as the concatenation of its ``sentencepiece_words``: the
    normalizer changes nothing but spaces, no piece holds "\\n" with anything, and U+2581 appears
    in a piece only as its prefix or in a piece of nothing else."""
    if sp.normalize(_SP_PROBE) != _SP_PROBE.replace(" ", "\u2581"):
        return False
    inner_space = re.compile("[^\u2581]\u2581")
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
            continue  # never matched against text
        piece = sp.id_to_piece(i)
        if ("\n" in piece and piece != "\n") or inner_space.search(piece):
            return False
    return True


def bpe_cuts_hold(spec: dict) -> bool:
    """Whether the "bpe" spec is the byte-level GPT-2 setup whose words encode apart (data/bpe_tokenizer.py's)."""
    t = spec["tokenizer"]
    pre, model = t.get("pre_tokenizer") or {}, t.get("model") or {}
    added = t.get("added_tokens") or []
    return (t.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex") is True
            and pre.get("add_prefix_space") is False and model.get("type") == "BPE" and model.get("dropout") is None
            and [a["content"] for a in added] == [END_OF_TEXT]
            and not any(a["lstrip"] or a["rstrip"] or a["single_word"] for a in added))


class _Rows(dict):
    """Word -> row; -1 for a word not in it (looked up at C speed, unlike dict.get with a default)."""

    def __missing__(self, word):
        return -1


class WordMemo:
    """Distinct words' ids, each word encoded once: a dict from word to row, the rows' ids in one array.

    Bounded: at ``capacity`` words or ``char_capacity`` characters it starts over; words longer than
    ``longest`` are encoded for the batch that holds them and not kept."""

    def __init__(self, encode_new, capacity: int = MEMO_WORDS, char_capacity: int = MEMO_CHARS,
                 longest: int = MEMO_WORD_CHARS):
        self._encode_new = encode_new  # list of distinct words -> (their ids concatenated, each one's count)
        self.capacity, self.char_capacity, self.longest = capacity, char_capacity, longest
        self.words = self.encoded = 0  # words looked up; distinct words encoded
        self._clear()

    def _clear(self) -> None:
        self._row = _Rows()
        self._ids = np.zeros(1 << 16, dtype=np.uint32)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lengths = np.zeros(1 << 12, dtype=np.int64)
        self._n_ids = self._chars = 0

    def ids(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of ``words`` concatenated (uint32) and each word's id count."""
        rows = np.fromiter(map(self._row.__getitem__, words), dtype=np.int64, count=len(words))
        missing = rows < 0
        once: list[str] = []  # new long words: in the table for this call only
        if missing.any():
            new = list(dict.fromkeys(itertools.compress(words, missing)))
            once = [w for w in new if len(w) > self.longest]
            kept = [w for w in new if len(w) <= self.longest] if once else new
            chars = sum(map(len, kept))
            full = len(self._row) + len(new) > self.capacity or self._chars + chars > self.char_capacity
            if full and self._row:  # an empty memo takes the batch, whatever its size
                self._clear()
                return self.ids(words)
            self._add(kept)
            self._chars += chars
            before_once = (len(self._row), self._n_ids)
            self._add(once)
            rows[missing] = np.fromiter(map(self._row.__getitem__, itertools.compress(words, missing)),
                                        dtype=np.int64, count=int(missing.sum()))
            self.encoded += len(new)
        self.words += len(words)
        lengths = self._lengths[rows]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        # ragged gather: output position p of word k reads _ids[start_k + (p - out_start_k)]
        gather = np.repeat(self._starts[rows] - (ends - lengths), lengths) + np.arange(total)
        ids = self._ids[gather]
        if once:  # forget them: their rows were the last ones
            for w in once:
                del self._row[w]
            self._n_ids = before_once[1]
        return ids, lengths

    def _add(self, words: list[str]) -> None:
        if not words:
            return
        ids, lengths = self._encode_new(words)
        first, n = len(self._row), len(words)
        self._row.update(zip(words, range(first, first + n)))
        self._starts = _fit(self._starts, first + n)
        self._lengths = _fit(self._lengths, first + n)
        self._lengths[first:first + n] = lengths
        self._starts[first:first + n] = self._n_ids + np.cumsum(lengths) - lengths
        self._ids = _fit(self._ids, self._n_ids + len(ids))
        self._ids[self._n_ids:self._n_ids + len(ids)] = ids
        self._n_ids += len(ids)


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` itself when it holds ``size`` items, else a copy at least twice as long."""
    if size <= len(arr):
        return arr
    grown = np.zeros(max(size, 2 * len(arr)), dtype=arr.dtype)
    grown[:len(arr)] = arr
    return grown


def _split_at(ids: np.ndarray, separator: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``count`` words each followed by ``separator``: the words' ids and each one's count."""
    ends = np.flatnonzero(ids == separator)
    if len(ends) != count:  # a word that encoded to the separator: the words did not stay apart
        raise RuntimeError(f"expected {count} separators after the words, found {len(ends)}")
    return ids[ids != separator], np.diff(ends, prepend=-1) - 1


def lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


class BatchEncoder:
    """Token ids of many texts at once, equal to ``tok.encode_array`` of each (see the module text).

    ``unit``: what the memo remembers: "word", "line" (SentencePiece unigram, or a model whose words
    do not encode apart: ``encode_array`` encodes line by line), None (char, byte, and BPE whose
    words do not encode apart: text by text)."""

    def __init__(self, tok: Tokenizer, threads: bool = True):
        self.tok = tok
        self.memo: WordMemo | None = None
        self.unit: str | None = None
        self._split = None
        if tok.kind == "char":
            # code point -> id, -1 for a character not in the vocabulary (the last entry stands for
            # every code point past the table)
            points = np.array([ord(c) for c in tok.chars], dtype=np.int64)
            self._table = np.full(int(points.max(initial=0)) + 2, -1, dtype=np.int64)
            self._table[points] = np.arange(len(points))
        elif tok.kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=base64.b64decode(tok.spec["model"]))
            self._threads = -1 if threads else 1  # -1: the library's default, every core
            # Unigram's best segmentation is a float sum, whose rounding (and so a near tie) depends on
            # what came before in the line: its words are not encoded apart, its lines are.
            word = tok.spec.get("model_type") == "bpe" and sentencepiece_cuts_hold(self._sp)
            self.unit, self._split = ("word", sentencepiece_words) if word else ("line", lines)
            self.memo = WordMemo(self._encode_sentencepiece, longest=MEMO_WORD_CHARS if word else MEMO_LINE_CHARS)
        elif tok.kind == "bpe":
            if bpe_cuts_hold(tok.spec):
                self._bpe = native(tok.spec)
                self._bpe_specials = native(tok.spec)
                self._bpe_specials.encode_special_tokens = False  # <|endoftext|> between words is its id
                self.unit, self._split, self.memo = "word", bpe_words, WordMemo(self._encode_bpe)

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of ``texts`` concatenated, and each text's token count."""
        if self.tok.kind == "byte":
            data = [t.encode("utf-8") for t in texts]
            return (np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.uint32),
                    np.fromiter(map(len, data), dtype=np.int64, count=len(data)))
        if self.tok.kind == "char":
            return self._encode_chars(texts)
        if self.memo is None:  # BPE whose words do not encode apart: text by text
            parts = [self.tok.encode_array(t, np.uint32) for t in texts]
            return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32),
                    np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)))
        words, counts = [], []
        for text in texts:
            w = self._split(text)
            words += w
            counts.append(len(w))
        ids, word_lengths = self.memo.ids(words)
        # each text's token count: its words' counts summed (a text with no words has none)
        before_word = np.concatenate([[0], np.cumsum(word_lengths)])
        text_ends = before_word[np.cumsum(np.asarray(counts, dtype=np.int64))]
        return ids, np.diff(text_ends, prepend=0)

    def _encode_chars(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        points = codepoints("".join(texts))
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        if (ids < 0).any():
            for text in texts:  # the text with the unknown character raises encode_array's error
                self.tok.encode_array(text)
        return ids.astype(np.uint32), np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))

    def _encode_sentencepiece(self, words: list[str]):
        encoded = self._sp.encode(words, num_threads=self._threads)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint32, count=int(lengths.sum())), lengths

    def _encode_bpe(self, words: list[str]):
        plain = [w for w in words if END_OF_TEXT not in w]
        if len(plain) < len(words):  # a word spelling the separator: encoded alone, as characters
            return self._encode_bpe_alone(words)
        groups = [END_OF_TEXT.join(plain[i:i + BPE_GROUP]) + END_OF_TEXT for i in range(0, len(plain), BPE_GROUP)]
        encodings = self._bpe_specials.encode_batch_fast(groups, add_special_tokens=False)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32)
        return _split_at(ids, self.tok.eos_id, len(plain))

    def _encode_bpe_alone(self, words: list[str]):
        encodings = self._bpe.encode_batch_fast(words, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32), lengths
