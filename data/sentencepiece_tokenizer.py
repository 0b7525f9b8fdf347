"""Training a SentencePiece tokenizer on a deterministic sample of the training text.

Settings chosen for language modelling rather than translation: identity
normalization and no dummy prefix (decode(encode(text)) == text, and pieces
encoded separately concatenate to the same text), byte fallback (any text
encodes without <unk>), "\\n" as its own piece, digits split, and fixed ids
pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Iterable

SPECIALS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str, threads: int = 1) -> dict:
    """A tokenizer spec (kind "sentencepiece", model base64) trained on ``lines``."""
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)  # sampling inside the trainer; the input order is already fixed
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=0.9995, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], max_sentence_length=1 << 16,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=threads, minloglevel=2, **SPECIALS)
    proto = model.getvalue()
    return {"kind": "sentencepiece", "model_type": model_type, "requested_vocab_size": vocab_size,
            "model_sha256": hashlib.sha256(proto).hexdigest(), "model": base64.b64encode(proto).decode("ascii")}


MAX_SENTENCE = 1 << 14  # characters; SentencePiece silently drops longer sentences


def sample_lines(texts: Iterable[str]) -> Iterable[str]:
    """Training sentences: the sample's lines (SentencePiece learns within a sentence), blank ones
    dropped, and long lines (a one-line JSONL document) cut into pieces it will not skip."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                for start in range(0, len(line), MAX_SENTENCE):
                    yield line[start:start + MAX_SENTENCE]
