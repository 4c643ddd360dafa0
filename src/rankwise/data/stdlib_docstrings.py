"""The built-in dataset: "write the docstring for this function" pairs from the Python standard library.

Every machine with Python has this text, nobody here wrote it, and the split is a pure function of
the source, so runs on two machines with the same Python version see the same examples.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
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


EXTRACTOR_VERSION = 1  # bump when the extraction rules change, to invalidate caches


def extract(root: Path | None = None) -> list[dict]:
    """All (prompt, response) pairs under `root`, in a deterministic order (sorted paths, source order).

    The result is cached on disk per Python version (parsing the whole stdlib takes seconds).
    """
    root = root or stdlib_root()
    cache = _cache_path(root)
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    pairs = [dict(p) for p in _extract(root)]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(pairs))
        tmp.replace(cache)
    except OSError:  # a read-only home is fine: we just parse again next time
        pass
    return pairs


def _cache_path(root: Path) -> Path:
    key = hashlib.sha1(f"{root}|{sys.version}|{EXTRACTOR_VERSION}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "rankwise" / f"stdlib-docstrings-{key}.json"


@functools.lru_cache(maxsize=2)
def _extract(root: Path) -> tuple[dict, ...]:
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
    return tuple(pairs)
