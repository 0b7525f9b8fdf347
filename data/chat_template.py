"""Chat templates (the CHAT_TEMPLATE choice): a conversation as segments of text and special tokens.

``render(turns, template)`` gives the conversation as ``Segment``s, each a piece of text or the
name of a special token, marked trainable or not: an assistant turn's text and the token that closes
it are trainable (the loss is taken there), everything else (system and user turns, role headers,
separators) is prompt. ``prompt_text`` is the text a model is given to answer a conversation, with
special tokens spelled as their names: an evaluation task's prompt equals what SFT trains on.

Roles: system, user, assistant, and input (an Alpaca row's optional input, right after its user
turn: its own section in the alpaca template, joined to the user's text by a blank line in the
others). Every assistant turn ends with the template's ``stop_token``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from data.bpe_tokenizer import END_OF_TEXT
from data.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TEMPLATES = ("chatml", "alpaca", "plain")
ROLES = ("system", "user", "input", "assistant")
_STOP = {"chatml": IM_END, "alpaca": END_OF_TEXT, "plain": END_OF_TEXT}
_NEEDED = {"chatml": (IM_START, IM_END), "alpaca": (END_OF_TEXT,), "plain": (END_OF_TEXT,)}


class Segment(NamedTuple):
    text: str  # the text, or a special token's name when ``special``
    trainable: bool  # the loss is taken on these tokens (an assistant turn and its closing token)
    special: bool = False


def tokens_needed(template: str) -> tuple[str, ...]:
    """The special tokens ``template`` renders (<|endoftext|>: the tokenizer's end of text)."""
    return _NEEDED[_check(template)]


def stop_token(template: str) -> str:
    """The special token that closes each assistant turn (generation stops there; padding uses it)."""
    return _STOP[_check(template)]


def render(turns: Sequence[tuple[str, str]], template: str) -> list[Segment]:
    """The segments of a conversation of (role, text) turns in ``template``."""
    _check(template)
    out: list[Segment] = []
    for role, text in _joined_inputs(turns, template):
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} in a conversation: roles are {', '.join(ROLES)}")
        if role == "assistant":
            out += _assistant_header(template)
            out += [Segment(text, True), Segment(_STOP[template], True, True)]
            out += [Segment("\n", False)] if template == "chatml" else []
        else:
            out += _prompt_turn(role, text, template)
    return [s for s in out if s.text]


def prompt_text(turns: Sequence[tuple[str, str]], template: str) -> str:
    """The text before the assistant's answer to ``turns`` (which end on a user turn), special tokens
    as their names: what an evaluation task gives the model, equal to what SFT trains on."""
    text = []
    for segment in render([*turns, ("assistant", "")], template):
        if segment.trainable:
            break
        text.append(segment.text)
    return "".join(text)


def _check(template: str) -> str:
    if template not in TEMPLATES:
        raise DataError(f"CONFIG_CHAT_TEMPLATE: unknown chat template {template!r}; one of {', '.join(TEMPLATES)}")
    return template


def _joined_inputs(turns, template: str) -> list[tuple[str, str]]:
    """Turns with an input turn folded into the user turn before it, except in the alpaca template."""
    out: list[tuple[str, str]] = []
    for role, text in turns:
        if role == "input" and template != "alpaca":
            if not out or out[-1][0] != "user":
                raise DataError("an input turn must follow a user turn (an Alpaca row's instruction)")
            out[-1] = ("user", f"{out[-1][1]}\n\n{text}" if text else out[-1][1])
        else:
            out.append((role, text))
    return out


def _prompt_turn(role: str, text: str, template: str) -> list[Segment]:
    if template == "chatml":
        return [Segment(IM_START, False, True), Segment(f"{role}\n{text}", False),
                Segment(IM_END, False, True), Segment("\n", False)]
    if template == "alpaca":
        header = {"system": "", "user": "### Instruction:\n", "input": "### Input:\n"}[role]
        return [Segment(f"{header}{text}\n\n", False)]
    return [Segment(f"{text}\n", False)]


def _assistant_header(template: str) -> list[Segment]:
    if template == "chatml":
        return [Segment(IM_START, False, True), Segment("assistant\n", False)]
    return [Segment("### Response:\n", False)] if template == "alpaca" else []
