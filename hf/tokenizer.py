"""Our tokenizers as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

A char or byte vocabulary is a ``tokenizers`` BPE model with no merges and no pre-tokenizer
splitting: every character (char) or byte (byte, through the byte-level alphabet GPT-2 uses to
spell bytes as characters) is its own token, with our id. Neither has an end-of-text token, so
one, ``<|endoftext|>``, is appended after the real ids (id = the tokenizer's vocabulary size);
tokenizer_config.json sets ``split_special_tokens``, so even text that spells ``<|endoftext|>``
encodes as its characters, as ours does. A byte-level BPE tokenizer (data/bpe_tokenizer.py) is
already a ``tokenizers`` tokenizer.json with its own end-of-text token: written as it is. A
SentencePiece BPE model becomes a ``tokenizers`` BPE model with byte fallback (hf/sentencepiece.py)
whose end of text is its own eos piece ``</s>`` (id 3); a unigram model is refused by name. Special
tokens a chat template added (post-training) follow as special added tokens with our ids; such a
tokenizer's config parses them in text (``split_special_tokens`` off), as prompts rendered with the
template spell them.
"""

from __future__ import annotations

import json

from data.bpe_tokenizer import native, native_json
from data.tokenizer import Tokenizer
from hf.architectures import ExportRefused
from hf.sentencepiece import eos_piece, sentencepiece_json

EOS = "<|endoftext|>"
OWN_EOS = ("bpe", "sentencepiece")  # kinds with an end-of-text token of their own


def eos_id(tokenizer: Tokenizer) -> int:
    """The exported end-of-text id: the tokenizer's own (BPE's, SentencePiece's, or a <|endoftext|> a chat
    template added), else one past every id."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.vocab_size


def eos_token(tokenizer: Tokenizer) -> str:
    """The exported end-of-text token: SentencePiece's eos piece, else ``<|endoftext|>``."""
    return eos_piece(tokenizer.spec) if tokenizer.kind == "sentencepiece" else EOS


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json text whose encoding gives our ids: the base vocabulary, then the special tokens a
    chat template added (data/tokenizer.py ``added``, their ids after it), then an end-of-text token
    where the tokenizer has none."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    base = tokenizer if not tokenizer.added else Tokenizer({k: v for k, v in tokenizer.spec.items() if k != "added"})
    hf = HFTokenizer.from_str(base_tokenizer_json(base))
    specials = list(tokenizer.added) + ([] if tokenizer.eos_id is not None else [EOS])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    for name in specials:
        want = tokenizer.special_id(name) if name in tokenizer.added else tokenizer.vocab_size
        if hf.token_to_id(name) != want:
            raise AssertionError(f"{name} got id {hf.token_to_id(name)} in the exported tokenizer, ours is {want}")
    if hf.token_to_id(eos_token(tokenizer)) != eos_id(tokenizer):
        raise AssertionError(f"{eos_token(tokenizer)} is not id {eos_id(tokenizer)} in the exported tokenizer")
    return hf.to_str(pretty=True)


def base_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json text of a tokenizer without added special tokens (BPE and SentencePiece with their
    own end of text; char and byte without one)."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tokenizer.kind == "char":
        vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
        hf.decoder = decoders.Fuse()  # concatenate tokens (the default decoder joins them with spaces)
    elif tokenizer.kind == "byte":
        vocab = byte_alphabet()
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    elif tokenizer.kind == "bpe":  # already a tokenizers tokenizer with its end-of-text token (data/bpe_tokenizer.py)
        if native(tokenizer.spec).token_to_id(EOS) != tokenizer.eos_id:
            raise AssertionError(f"{EOS} is not id {tokenizer.eos_id} in the BPE tokenizer (data/bpe_tokenizer.py)")
        return native_json(tokenizer.spec)
    elif tokenizer.kind == "sentencepiece":  # its own </s>, already in the vocabulary (hf/sentencepiece.py)
        return sentencepiece_json(tokenizer.spec)
    else:
        raise ExportRefused(
            f"CONFIG_TOKENIZER={tokenizer.kind}: exporting this tokenizer to Hugging Face files is not implemented "
            "(char, byte, byte-level BPE and SentencePiece BPE are); train with one of those to export a run")
    return hf.to_str(pretty=True)


def byte_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet (GPT-2's bytes_to_unicode, which ``tokenizers``'
    ByteLevel pre-tokenizer uses): printable Latin-1 bytes stand for themselves, the others for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """File name -> text of the tokenizer files AutoTokenizer.from_pretrained reads."""
    eos = eos_token(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "bos_token": None, "unk_token": None, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              # text spelling a special token: its characters (as our encode), but a chat template's tokens
              # are parsed (as our encode_special, which prompts rendered with the template need)
              "split_special_tokens": not tokenizer.added}
    special = {"eos_token": eos, "pad_token": eos}
    return {"tokenizer.json": hf_tokenizer_json(tokenizer),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
