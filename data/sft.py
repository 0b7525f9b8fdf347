"""Supervised fine-tuning data: SFT_DATA's rows as conversations, tokenized with a trainable mask.

A row is read as whichever shape it has: chat (a list of {"role", "content"} messages in
SFT_FIELD_MESSAGES, or ShareGPT's {"from", "value"} with human/gpt) or Alpaca (SFT_FIELD_INSTRUCTION,
the optional SFT_FIELD_INPUT, SFT_FIELD_OUTPUT). Each becomes (role, text) turns, rendered with
CHAT_TEMPLATE (data/chat_template.py) and tokenized: ``Example.mask`` is True on the tokens the
loss is taken on (assistant text and its closing token). Adjacent text segments with the same mask
are encoded together, so a prompt's ids equal ``tokenizer.encode_special(prompt_text(...))``.
The last SFT_VAL_FRACTION of the rows (file order, at least one) is the validation set.
Batches of these examples: data/sft_batches.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from data.chat_template import ROLES, Segment, render, stop_token, tokens_needed
from data.errors import DataError
from data.records import read_records
from data.sft_batches import SFTBatches, pack_rows
from data.tokenizer import Tokenizer

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant"}


@dataclass(frozen=True)
class SFTConfig:
    """The SFT data symbols (defaults equal Kconfig's)."""
    data: str = ""
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    field_messages: str = "messages"
    val_fraction: float = 0.05
    template: str = "chatml"
    packing: bool = True
    truncate: bool = False

    @classmethod
    def from_config(cls, cfg) -> "SFTConfig":
        return cls(cfg.SFT_DATA, cfg.SFT_FIELD_INSTRUCTION, cfg.SFT_FIELD_INPUT, cfg.SFT_FIELD_OUTPUT,
                   cfg.SFT_FIELD_MESSAGES, cfg.SFT_VAL_FRACTION, cfg.CHAT_TEMPLATE, cfg.SFT_PACKING,
                   cfg.SFT_TRUNCATE)


class Row(NamedTuple):
    turns: list[tuple[str, str]]
    where: str  # file:line or file row N


class Example(NamedTuple):
    ids: np.ndarray  # int64 token ids
    mask: np.ndarray  # bool, True where the loss is taken (the token is a target)
    where: str


def load_sft_rows(cfg, root: Path) -> list[list[tuple[str, str]]]:
    """The (role, text) turns of every SFT_DATA row."""
    return [row.turns for row in read_rows(SFTConfig.from_config(cfg), root)]


def read_rows(c: SFTConfig, root: Path) -> list[Row]:
    return [Row(row_turns(row, where, c), where) for row, where in read_records(c.data, root, "CONFIG_SFT_DATA")]


def row_turns(row: dict, where: str, c: SFTConfig) -> list[tuple[str, str]]:
    """A row's turns: chat shape when it has the messages field, else Alpaca shape."""
    if c.field_messages in row:
        return _chat_turns(row[c.field_messages], where, c.field_messages)
    if c.field_instruction in row or c.field_output in row:
        instruction = _text(row, c.field_instruction, where, "SFT_FIELD_INSTRUCTION")
        output = _text(row, c.field_output, where, "SFT_FIELD_OUTPUT")
        extra = row.get(c.field_input)
        if extra is not None and not isinstance(extra, str):
            raise _row_error(where, f"field {c.field_input!r} (CONFIG_SFT_FIELD_INPUT) is a {type(extra).__name__}, "
                                    "not a string")
        return [("user", instruction), *([("input", extra)] if extra else []), ("assistant", output)]
    raise _row_error(where, f"the row has neither a {c.field_messages!r} message list (chat shape, "
                            f"CONFIG_SFT_FIELD_MESSAGES) nor {c.field_instruction!r}/{c.field_output!r} fields (Alpaca "
                            f"shape); its fields are {sorted(row)[:10]}: set CONFIG_SFT_FIELD_* to their names")


def _chat_turns(messages, where: str, field: str) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _row_error(where, f"field {field!r} must be a non-empty list of messages, not {messages!r:.60}")
    turns = []
    for number, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise _row_error(where, f"message {number} is a {type(m).__name__}, not an object with role and content")
        role, text = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
        role = SHAREGPT_ROLES.get(role, role)
        if role not in ROLES or role == "input":
            raise _row_error(where, f"message {number} has unknown role {role!r}: roles are system, user, assistant "
                                    "(ShareGPT: human, gpt)")
        if not isinstance(text, str):
            raise _row_error(where, f"message {number} ({role}) has no string content (role/content or from/value)")
        if role == "assistant" and not text.strip():
            raise _row_error(where, f"message {number} is an empty assistant response")
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        raise _row_error(where, "the conversation has no assistant message: nothing to learn")
    return turns


def _text(row: dict, field: str, where: str, symbol: str) -> str:
    value = row.get(field)
    if value is None:
        raise _row_error(where, f"missing field {field!r} (CONFIG_{symbol}); its fields are {sorted(row)[:10]}")
    if not isinstance(value, str):
        raise _row_error(where, f"field {field!r} (CONFIG_{symbol}) is a {type(value).__name__}, not a string")
    if not value.strip():
        raise _row_error(where, f"field {field!r} (CONFIG_{symbol}) is empty")
    return value


def _row_error(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}; fix or remove the row")


def require_template_tokens(tokenizer: Tokenizer, template: str) -> None:
    """Refuse a tokenizer that lacks a special token the template renders."""
    missing = [name for name in tokens_needed(template) if tokenizer.special_id(name) is None]
    if missing:
        raise DataError(f"CONFIG_CHAT_TEMPLATE={template}: the {tokenizer.kind} tokenizer has no {', '.join(missing)}; "
                        "add them with data.tokenizer.with_special_tokens (the fine-tuning trainer does, growing "
                        "the embedding) before tokenizing")


def encode_segments(segments: Sequence[Segment], tokenizer: Tokenizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trainable mask) of rendered segments; adjacent text with the same mask encodes as one text."""
    merged: list[Segment] = []
    for s in segments:
        if merged and not s.special and not merged[-1].special and merged[-1].trainable == s.trainable:
            merged[-1] = Segment(merged[-1].text + s.text, s.trainable)
        else:
            merged.append(s)
    ids: list[int] = []
    mask: list[bool] = []
    for s in merged:
        if s.special:
            piece = [tokenizer.special_id(s.text)]
            if piece[0] is None:
                raise DataError(f"{where}: the tokenizer has no special token {s.text}; see CONFIG_CHAT_TEMPLATE")
        else:
            try:
                piece = tokenizer.encode(s.text)
            except ValueError as e:  # a char vocabulary without some character
                raise DataError(f"{where}: the {tokenizer.kind} tokenizer cannot encode the row: {e}; "
                                "use CONFIG_TOKENIZER_BYTE, _SENTENCEPIECE or _BPE, which encode any text") from None
        ids += piece
        mask += [s.trainable] * len(piece)
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)


def fit_length(ids: np.ndarray, mask: np.ndarray, block_size: int, truncate: bool, where: str,
               symbol: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, mask, truncated): an example fits in block_size + 1 tokens (block_size predictions);
    a longer one is cut with ``truncate``, else an error naming its row."""
    if len(ids) <= block_size + 1:
        return ids, mask, False
    if not truncate:
        raise DataError(f"{where}: the example is {len(ids)} tokens, longer than CONFIG_BLOCK_SIZE={block_size} + 1; "
                        f"shorten it, raise BLOCK_SIZE, or set CONFIG_SFT_TRUNCATE=y to cut it ({symbol})")
    return ids[:block_size + 1], mask[:block_size + 1], True


def split_rows(n: int, fraction: float, symbol: str) -> int:
    """How many of ``n`` rows train: the last ``fraction`` (at least one) is held out for validation."""
    n_val = max(1, int(n * fraction))
    if n - n_val < 1:
        raise DataError(f"{symbol}: {n} row(s) leave none for training after the validation share "
                        f"(CONFIG_SFT_VAL_FRACTION={fraction}); add rows")
    return n - n_val


@dataclass
class SFTData:
    """Tokenized SFT examples: ``train`` and ``val``, ``stats`` (logged once), the padding id."""
    train: list[Example]
    val: list[Example]
    stats: dict
    pad_id: int
    config: SFTConfig

    @classmethod
    def from_config(cls, cfg, tokenizer: Tokenizer, block_size: int, root: Path,
                    log: Callable[[str], None] = print) -> "SFTData":
        c = SFTConfig.from_config(cfg)
        require_template_tokens(tokenizer, c.template)
        examples, truncated, dropped = [], 0, 0
        for row in read_rows(c, root):
            ids, mask = encode_segments(render(row.turns, c.template), tokenizer, row.where)
            ids, mask, cut = fit_length(ids, mask, block_size, c.truncate, row.where, "CONFIG_SFT_DATA")
            truncated += cut
            if not mask[1:].any():  # cut inside the prompt: no response token left to learn
                dropped += 1
                continue
            examples.append(Example(ids, mask, row.where))
        if len(examples) < 2:
            raise DataError(f"CONFIG_SFT_DATA={c.data!r}: {len(examples)} usable example(s) ({dropped} cut to their "
                            "prompt by CONFIG_SFT_TRUNCATE); at least two are needed (training and validation)")
        n_train = split_rows(len(examples), c.val_fraction, "CONFIG_SFT_DATA")
        train, val = examples[:n_train], examples[n_train:]
        stats = {"examples": len(examples), "train_examples": len(train), "val_examples": len(val),
                 "tokens": int(sum(len(e.ids) for e in examples)),
                 "response_tokens": int(sum(e.mask[1:].sum() for e in examples)),
                 "truncated": truncated, "dropped": dropped,
                 "packed_sequences": len(pack_rows([len(e.ids) for e in train], block_size + 1)) if c.packing else None}
        log(f"sft: {stats['examples']} examples ({len(train)} train, {len(val)} val) from {c.data}, "
            f"{stats['tokens']} tokens, {stats['response_tokens']} response tokens, {truncated} truncated"
            + (f", {dropped} dropped (prompt over BLOCK_SIZE)" if dropped else "")
            + (f"; train packed into {stats['packed_sequences']} sequences of {block_size}" if c.packing else "")
            + f"; template {c.template}")
        return cls(train, val, stats, tokenizer.special_id(stop_token(c.template)), c)

    def batches(self, split: str, batch_size: int, block_size: int, device, seed: int):
        """SFTBatches over the ``split`` ("train" or "val") examples."""
        return SFTBatches(self.train if split == "train" else self.val, batch_size, block_size, device, seed,
                          self.config.packing, pad_id=self.pad_id)
