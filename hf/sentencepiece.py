"""A SentencePiece model (data/sentencepiece_tokenizer.py's settings) as a ``tokenizers`` tokenizer.json
whose encoding gives our ids.

What our encoder does, and its counterpart here:

- text is cut after each line end exactly as Python's ``str.splitlines(keepends=True)`` cuts it
  (data/tokenizer.py encodes line by line): a ``Split`` pre-tokenizer on the same terminators,
  each kept at the end of its line;
- identity normalization, no dummy prefix, no whitespace collapsing: only the space becomes
  SentencePiece's "▁" (a ``Replace`` normalizer);
- the model, with our ids (vocabulary in id order) and byte fallback (``<0xXX>`` pieces) for
  characters outside it. SentencePiece's BPE merges the adjacent pair whose joined piece has the
  highest score, leftmost first; ``models.BPE`` merges by rank, leftmost first: ranking each merge
  by its joined piece's score gives the same merges. Only normal pieces join (SentencePiece's
  ``pieces_``; control, unknown and byte pieces are reserved, never matched in text);
- a unigram model is refused by name: SentencePiece's Viterbi search adds scores in float32 and
  ``models.Unigram`` in float64, so segmentations of equal score (the same pieces in another
  order, as in runs of spaces) are broken differently; measured on the embedded corpus, 11 of 25
  held-out 20 kB samples got other ids at vocabulary 4000;
- end of text is SentencePiece's own eos piece (``</s>``, id 3), an added special token; as in
  our encoder, text that spells it encodes as its characters (tokenizer_config.json's
  ``split_special_tokens``).

Decoding: "▁" back to a space, byte pieces fused back into characters.
"""

from __future__ import annotations

import base64

from hf.architectures import ExportRefused

SPACE = "\u2581"  # SentencePiece's visible space
# str.splitlines' line boundaries, "\r\n" first so it stays one terminator
LINE_ENDS = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"


def processor(spec: dict):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=base64.b64decode(spec["model"]))


def eos_piece(spec: dict) -> str:
    sp = processor(spec)
    return sp.id_to_piece(sp.eos_id())


def sentencepiece_json(spec: dict) -> str:
    """tokenizer.json text for a SentencePiece tokenizer spec (kind "sentencepiece")."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    sp = processor(spec)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    reserved = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    if any(sp.is_unused(i) for i in range(len(pieces))):
        raise ExportRefused("CONFIG_TOKENIZER=sentencepiece: the model has unused pieces, which our settings never "
                            "make; retrain the tokenizer (data/sentencepiece_tokenizer.py)")
    if spec["model_type"] != "bpe":
        raise ExportRefused(
            f"CONFIG_SENTENCEPIECE_MODEL_TYPE={spec['model_type']}: a SentencePiece {spec['model_type']} model has no "
            "exact tokenizers counterpart (SentencePiece breaks ties between equal-score segmentations in float32, "
            "tokenizers' Unigram in float64: runs of spaces get other ids); train with CONFIG_SENTENCEPIECE_BPE (or "
            "CONFIG_TOKENIZER_BPE) to export")
    model = _bpe(sp, pieces, reserved)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(LINE_ENDS), behavior="merged_with_previous")
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    eos = pieces[sp.eos_id()]
    hf.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    if hf.token_to_id(eos) != sp.eos_id():
        raise AssertionError(f"{eos} got id {hf.token_to_id(eos)}, SentencePiece's eos is {sp.eos_id()}")
    return hf.to_str(pretty=True)


def _bpe(sp, pieces: list[str], reserved: set[int]):
    from tokenizers import models

    vocab = {p: i for i, p in enumerate(pieces)}
    joinable = {p: i for i, p in enumerate(pieces) if i not in reserved}
    merges = []  # each way to join two pieces into a third, ranked by the third's score (highest first)
    for piece, i in joinable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in joinable and right in joinable:
                merges.append((-sp.get_score(i), i, cut, left, right))
    merges.sort()
    return models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges], byte_fallback=True,
                      ignore_merges=False, fuse_unk=False, unk_token=pieces[sp.unk_id()])
