"""A byte-level BPE tokenizer (GPT-2 style) trained with the Hugging Face ``tokenizers`` library.

Byte-level: text is UTF-8 bytes mapped to 256 printable symbols before the GPT-2
pre-tokenizer regex splits it into words and BPE merges within them, so any text
encodes without an unknown token and decodes back exactly (no normalizer, no
prefix space). Ids: END_OF_TEXT 0 (every document ends with it, as with
SentencePiece's eos), the 256 byte symbols, then the learned merges.

Encoding in parallel: ``tokenizers`` encodes a batch of strings on several threads,
so a long text is cut into chunks at places where the pre-tokenizer always splits
anyway (``safe_chunks``), which leaves the ids exactly those of encoding it whole.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

END_OF_TEXT = "<|endoftext|>"
CHUNK_CHARS = 2048  # measured: larger chunks encode more slowly, smaller ones gain nothing

# One space or newline between two non-space characters. The GPT-2 regex ends every word before such
# a character and starts the next word with it (" word", or "\n" alone), whatever follows, so cutting
# right before it changes no word. Python's \S is narrower than the Rust regex's (it counts U+001C..1F
# as space), so where the two disagree this finds no cut rather than a wrong one.
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


def safe_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut where the pre-tokenizer splits anyway."""
    start = 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict:
    """A tokenizer spec (kind "bpe", the native tokenizer.json as ``tokenizer``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((chunk for text in texts for chunk in safe_chunks(text)), trainer)
    return {"kind": "bpe", "requested_vocab_size": vocab_size, "tokenizer": json.loads(tok.to_str())}


def native(spec: dict):
    """The ``tokenizers.Tokenizer`` of a "bpe" spec (what tokenizer.json holds, for export and encoding).

    Text that spells <|endoftext|> encodes as its characters (``encode_special_tokens``, which
    tokenizer.json does not record: transformers' ``split_special_tokens``), so id 0 comes only
    from a document's end and every text decodes back exactly."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec["tokenizer"]))
    tok.encode_special_tokens = True
    return tok


def native_json(spec: dict) -> str:
    """The native tokenizer.json text of a "bpe" spec, as transformers' PreTrainedTokenizerFast reads it."""
    return native(spec).to_str(pretty=True)


def token_byte_lengths(spec: dict) -> list[int]:
    """UTF-8 bytes each id of a "bpe" spec decodes to: each character of a byte-level token stands
    for one byte, and <|endoftext|> decodes to nothing (bits per byte sums these over a split)."""
    tok = native(spec)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return [0 if p in special else len(p) for p in pieces]
