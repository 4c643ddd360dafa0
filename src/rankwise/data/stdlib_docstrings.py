"""The built-in dataset: "write the docstring for this function" pairs from the Python standard library.

Every machine with Python has this text, nobody here wrote it, and the split is a pure function of
the source, so runs on two machines with the same Python version see the same examples.
"""
from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
from pathlib import Path

PROMPT = "Write the docstring for this Python function.\n\n```python\n{code}\n```"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
             "ensurepip", "__pycache__", "venv"}
MAX_CODE_CHARS = 900
MAX_DOC_CHARS = 400


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _pair(source: str, lines: list[str], node) -> dict | None:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:  # a body that is only a docstring teaches nothing
        return None
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    doc_node = node.body[0]
    kept = lines[first - 1: doc_node.lineno - 1] + lines[doc_node.end_lineno: node.end_lineno]
    code = textwrap.dedent("".join(kept)).strip("\n")
    doc = doc.strip()
    if not code or len(code) > MAX_CODE_CHARS or len(doc) > MAX_DOC_CHARS:
        return None
    return {"prompt": PROMPT.format(code=code), "response": doc}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def extract(root: Path | None = None) -> list[dict]:
    """All (prompt, response) pairs under `root`, in a deterministic order (sorted paths, source order)."""
    root = root or stdlib_root()
    pairs: list[dict] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines(keepends=True)
            for node in _functions(tree):
                pair = _pair(source, lines, node)
                if pair and pair["prompt"] not in seen:  # identical functions appear in several modules
                    seen.add(pair["prompt"])
                    pairs.append(pair)
    return pairs
