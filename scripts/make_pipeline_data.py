"""Writes the pipeline-tiny preset's post-training data, from the Python standard library's source.

Every example asks for the name of the function a short snippet defines, so a program can check
the answer:

    user:      Function name?\\n<the def line and the next lines of code, dedented, 2-6 lines>
    assistant: <the function's name>

- data/pipeline/sft.jsonl: SFT examples in the chat shape ({"messages": [user, assistant]});
- data/pipeline/dpo.jsonl: preference pairs with the TRL columns prompt, chosen (the name) and
  rejected (another function name of the same file, or a near miss: the name cut short or with
  a part left out);
- evaluation/tasks/pipeline_function_name/: held-out prompts as an lm-eval generate_until task
  (exact match), the prompt rendered with the chatml template exactly as SFT renders it
  (data/chat_template.py's prompt_text, special tokens spelled as their names);
- evaluation/tasks/pipeline_preference/: held-out pairs as a multiple_choice task (the chosen
  and the rejected answer, each with its closing <|im_end|>): preference accuracy.

Training rows come from the modules before "t" in sorted order, the held-out tasks from the later
ones (t..z, as python_next_line's), so no evaluated function was trained on. Snippets leave out
docstrings, comments and blank lines. Each example fits the quickstart model's BLOCK_SIZE of 128
characters in the chatml template (a special token counts as one), the prompt leaving room for the
answer's generation (the alpaca template's headers are longer: with it, set SFT_TRUNCATE). ASCII
only. Deterministic for a given Python version; the committed files were made with Python 3.11.7:

    .venv/bin/python scripts/make_pipeline_data.py
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.chat_template import prompt_text, render, stop_token  # noqa: E402
from data.corpus import embedded_source  # noqa: E402

DATA_DIR = ROOT / "data" / "pipeline"
TASKS_DIR = ROOT / "evaluation" / "tasks"
QUESTION = "Function name?\n"
BLOCK = 128  # the quickstart model's BLOCK_SIZE: every example's tokens (specials count one)
MAX_NAME = 16  # characters of an answer
MAX_GEN = MAX_NAME + 2  # the eval task's max_gen_toks: the name, <|im_end|> and a newline
MAX_LINES, MAX_SNIPPET = 6, 72
SFT_ROWS, DPO_ROWS, EVAL_ROWS = 3000, 2000, 250
HELD_OUT = tuple("tuvwxyz")  # first letters of the held-out modules


def functions(path: Path, relative: str) -> list[tuple[str, str, str]]:
    """(name, snippet, source) of each usable function in a module: the def line and what follows,
    dedented, as many lines (2..MAX_LINES) as fit MAX_SNIPPET characters; ASCII printable only."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.name) > MAX_NAME \
                or node.name.startswith("__"):  # dunder names (__init__...) would be most of the answers
            continue
        skip = _docstring_lines(node)
        span = [lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                if i not in skip and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")]
        block = textwrap.dedent("\n".join(span[:MAX_LINES])).split("\n")
        snippet = []
        for line in block:
            if len("\n".join(snippet + [line.rstrip()])) > MAX_SNIPPET:
                break
            snippet.append(line.rstrip())
        while snippet and not snippet[-1].strip():
            snippet.pop()
        body = "\n".join(snippet)
        if len(snippet) >= 2 and _printable(body) and body.count("def ") == 1:
            out.append((node.name, body, f"{relative}:{node.lineno}"))
    return out


def _docstring_lines(node) -> set[int]:
    """The line numbers of a function's docstring (left out of its snippet: they make it long)."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return set()


def _printable(text: str) -> bool:
    return all(32 <= ord(c) < 127 or c == "\n" for c in text)


def tokens(turns, template: str) -> int:
    """Token count of a rendered conversation under a char or byte tokenizer (ASCII text)."""
    return sum(1 if s.special else len(s.text) for s in render(turns, template))


def fits(content: str, answer: str) -> bool:
    turns = [("user", content), ("assistant", answer)]
    prompt = 0
    for segment in render([("user", content), ("assistant", "")], "chatml"):
        if segment.trainable:
            break
        prompt += 1 if segment.special else len(segment.text)
    return tokens(turns, "chatml") <= BLOCK and prompt + MAX_GEN <= BLOCK


def near_miss(name: str, rng: random.Random) -> str:
    """A wrong answer close to ``name``: a part of a snake_case name left out, or the name cut short."""
    parts = [p for p in name.split("_") if p]
    if len(parts) > 1:
        drop = rng.randrange(len(parts))
        return "_".join(p for i, p in enumerate(parts) if i != drop)
    return name[:max(1, len(name) - 1 - rng.randrange(max(1, len(name) // 2)))]


def wrong_answer(name: str, same_file: list[str], rng: random.Random) -> str:
    others = sorted(set(same_file) - {name})
    if others and rng.random() < 0.5:
        return rng.choice(others)
    miss = near_miss(name, rng)
    return miss if miss != name else (rng.choice(others) if others else name + "s")


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = embedded_source(1 << 40).files  # every module the embedded corpus reads, sorted
    train, held = [], []
    for f in files:
        relative = f.relative_to(stdlib).as_posix()
        every = functions(f, relative)
        names = [n for n, _, _ in every]
        found = [(n, s, src) for n, s, src in every if fits(QUESTION + s, n)]
        (held if relative[0].lower() in HELD_OUT else train).extend((n, s, src, names) for n, s, src in found)
    rng = random.Random(20261213)
    pools = []
    for pool in (train, held):
        seen, unique = set(), []
        for item in pool:
            if item[1] not in seen:
                seen.add(item[1])
                unique.append(item)
        rng.shuffle(unique)
        pools.append(unique)
    train, held = pools
    if len(train) < SFT_ROWS + DPO_ROWS or len(held) < 2 * EVAL_ROWS:
        raise SystemExit(f"too few functions: {len(train)} training, {len(held)} held out")
    sft = [{"messages": [{"role": "user", "content": QUESTION + s}, {"role": "assistant", "content": n}],
            "source": src} for n, s, src, _ in train[:SFT_ROWS]]
    dpo = [{"prompt": QUESTION + s, "chosen": n, "rejected": wrong_answer(n, names, rng), "source": src}
           for n, s, src, names in train[SFT_ROWS:SFT_ROWS + DPO_ROWS]]
    generate = [{"prompt": prompt_text([("user", QUESTION + s)], "chatml"), "answer": n, "source": src}
                for n, s, src, _ in held[:EVAL_ROWS]]
    stop = stop_token("chatml")
    preference = []
    for n, s, src, names in held[EVAL_ROWS:2 * EVAL_ROWS]:
        choices = [n + stop, wrong_answer(n, names, rng) + stop]
        rng.shuffle(choices)
        preference.append({"prompt": prompt_text([("user", QUESTION + s)], "chatml"), "choices": choices,
                           "answer": choices.index(n + stop), "source": src})
    write(DATA_DIR / "sft.jsonl", sft)
    write(DATA_DIR / "dpo.jsonl", dpo)
    write(TASKS_DIR / "pipeline_function_name" / "test.jsonl", generate)
    write(TASKS_DIR / "pipeline_preference" / "test.jsonl", preference)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
    if not path.exists() or path.read_text(encoding="ascii") != text:  # generated files only when changed
        path.write_text(text, encoding="ascii")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {len(text.encode()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
