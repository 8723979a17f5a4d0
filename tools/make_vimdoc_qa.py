"""Instruction data from the Vim manual: one question/answer pair per help tag definition.

python tools/make_vimdoc_qa.py [--data ../shared/data/vimdoc] [--out runs/vimdoc_qa] [--max-chars 600]

A help tag is defined by ``*tag*`` at the end of a line (several tag lines in a row name one entry);
the answer is the entry's text: the tag line without its tags, then the lines that follow up to the
next blank line or tag definition. The question depends on the kind of tag (Ex command, option,
function, key, other). Pairs from train.txt go to train.jsonl and pairs from valid.txt to eval.jsonl
(split by help file, like the text), as alpaca records {instruction, input, output}; input names the
help file. The output lies under runs/, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

TAG = re.compile(r"(?:^|(?<=\s))\*([^\s*|]+)\*(?=\s|$)")
FILE_HEADER = re.compile(r"^\*([\w.-]+\.txt)\*")
RULER = re.compile(r"^\s*[-=]{3,}\s*$")


def question(tag: str) -> str:
    if tag.startswith(":"):
        return f"What does the Ex command {tag} do in Vim?"
    if tag.startswith("'") and tag.endswith("'"):
        return f"What is the Vim option {tag}?"
    if tag.endswith("()"):
        return f"What does the Vim function {tag} do?"
    if re.match(r"^([a-z]_)?(CTRL-|<)", tag):
        return f"What does {tag} do in Vim?"
    return f"Explain {tag!r} from the Vim manual."


def entries(text: str, max_chars: int) -> Iterator[tuple[str, str, str]]:
    """(help file, first tag, answer) for each tag definition in ``text``."""
    lines = text.splitlines()
    help_file = ""
    i = 0
    while i < len(lines):
        header = FILE_HEADER.match(lines[i])
        if header:
            help_file = header.group(1)
            i += 1
            continue
        tags = TAG.findall(lines[i])
        if not tags:
            i += 1
            continue
        heading = [TAG.sub("", lines[i]).rstrip()]
        i += 1
        while i < len(lines) and TAG.search(lines[i]) and not TAG.sub("", lines[i]).strip():
            i += 1  # more tag-only lines of the same entry
        while i < len(lines) and (not lines[i].strip() or RULER.match(lines[i])) and not heading[0].strip():
            i += 1  # a section title: its text starts after the ruler and blank lines
        body = []
        while i < len(lines) and lines[i].strip() and not TAG.search(lines[i]) and not FILE_HEADER.match(lines[i]):
            if not RULER.match(lines[i]):
                body.append(lines[i].expandtabs(8))
            i += 1
        answer_lines, size = [], 0
        for line in [h.expandtabs(8) for h in heading if h.strip()] + body:
            if size + len(line) > max_chars and answer_lines:
                break
            answer_lines.append(line)
            size += len(line) + 1
        answer = textwrap.dedent("\n".join(answer_lines)).strip()
        if len(answer) >= 40 and not tags[0].endswith(".txt"):
            yield help_file, tags[0], answer


def build(path: Path, max_chars: int) -> list[dict[str, str]]:
    seen: set[str] = set()
    out = []
    for help_file, tag, answer in entries(path.read_text(encoding="utf-8"), max_chars):
        if tag in seen:
            continue
        seen.add(tag)
        out.append({"instruction": question(tag), "input": f"Help file: {help_file}", "output": answer})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/vimdoc", help="directory with train.txt and valid.txt")
    ap.add_argument("--out", default="runs/vimdoc_qa")
    ap.add_argument("--max-chars", type=int, default=600, help="answers are cut at a line boundary near this")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src, name in (("train.txt", "train.jsonl"), ("valid.txt", "eval.jsonl")):
        path = Path(args.data) / src
        if not path.is_file():
            print(f"error: {path} not found; pass --data DIR", file=sys.stderr)
            return 2
        pairs = build(path, args.max_chars)
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        print(f"{out / name}: {len(pairs)} question/answer pairs from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
