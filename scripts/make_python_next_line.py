"""Writes evaluation/tasks/python_next_line/{test,fewshot}.jsonl: pick the real next line of Python code.

Each document is a few lines of code from the Python standard library's later modules (t..z, which
the embedded corpus's first megabytes do not reach) and four candidate next lines: the real one and
three lines from other files with the same indentation and a similar length, so neither indentation
nor length gives the answer away. ASCII only, so a char tokenizer fitted on Python source encodes
every document. Deterministic for a given Python version; the committed files were made with
Python 3.11.7:

    .venv/bin/python scripts/make_python_next_line.py
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "evaluation" / "tasks" / "python_next_line"
MODULES = ("textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py", "urllib", "uuid.py",
           "warnings.py", "wave.py", "weakref.py", "webbrowser.py", "wsgiref", "xml", "zipfile.py", "zoneinfo")
CONTEXT_LINES, CHOICES, TEST, FEWSHOT = 6, 4, 300, 20


def candidate_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return text.split("\n") if text.isascii() else []


def usable(line: str) -> bool:
    body = line.strip()
    return 16 <= len(line) <= 72 and bool(body) and not body.startswith(("#", '"', "'"))


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in MODULES:
        p = stdlib / name
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    lines = {f: candidate_lines(f) for f in files if f.exists()}
    rng = random.Random(20261201)
    pool = [(f, i) for f, ls in lines.items() for i, line in enumerate(ls) if i >= CONTEXT_LINES and usable(line)]
    rng.shuffle(pool)
    by_shape: dict[tuple[str, int], list[tuple[Path, str]]] = {}
    for f, ls in lines.items():
        for line in ls:
            if usable(line):
                by_shape.setdefault((indent(line), len(line) // 8), []).append((f, line))
    docs, seen = [], set()
    for f, i in pool:
        answer, context = lines[f][i], "\n".join(lines[f][i - CONTEXT_LINES:i]) + "\n"
        if answer in seen or not context.strip():
            continue
        others = sorted({line for g, line in by_shape[(indent(answer), len(answer) // 8)] if g != f and line != answer})
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "answer": choices.index(answer), "source": f"{f.relative_to(stdlib)}:{i + 1}"})
        seen.add(answer)
        if len(docs) == TEST + FEWSHOT:
            break
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("test.jsonl", docs[:TEST]), ("fewshot.jsonl", docs[TEST:])):
        (OUT / name).write_text("".join(json.dumps(d) + "\n" for d in part), encoding="ascii")
        print(f"{OUT / name}: {len(part)} documents")


if __name__ == "__main__":
    main()
