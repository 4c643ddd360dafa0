"""The house's floors: no module imports one above its own (function-level imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

import rankwise

ROOT = Path(rankwise.__file__).parent
# lowest first; a module may import its own floor and those below it
FLOORS = [
    {"__init__", "config", "options", "plugins", "runtime"},  # the ground: settings and devices
    {"data", "models", "tiny"},  # where examples and weights come from
    {"train"},  # the loop's parts: loss, FLOPs, schedule, stream, checkpoint, metrics, dist
    {"fastforward", "ffba", "lorafa"},  # method cores, usable without rankwise's loop
    {"methods", "optim", "hooks"},  # the registries (optimizers pair with methods through them)
    {"validate", "generate", "compare"},  # checking a run, using a trained one
    {"recipes"},  # train, pretrain: compose everything below
    {"bench", "cli", "__main__"},  # measure, parse and call
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _part(module: str) -> str:
    """The floor-defining part of a dotted rankwise module name: rankwise.train.loss -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rankwise":  # from rankwise import runtime
                yield from (f"rankwise.{a.name}" for a in node.names)
            else:
                yield node.module


def upward_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        here = relative.parts[0]
        assert here in FLOOR, f"{relative}: put it on a floor in tests/test_layers.py"
        for target in _imports(path):
            if target == "rankwise" or not target.startswith("rankwise."):
                continue
            there = _part(target)
            assert there in FLOOR, f"{relative} imports {target}, which is on no floor"
            if FLOOR[there] > FLOOR[here]:
                found.append(f"{relative} -> {target}")
    return found


def test_no_import_runs_up_the_house():
    assert upward_imports() == []


def test_the_walk_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a low module importing a recipe is reported (function-level too)."""
    fake = tmp_path / "rankwise"
    (fake / "train").mkdir(parents=True)
    (fake / "train" / "loss.py").write_text("def f():\n    from rankwise.recipes.train import train\n")
    (fake / "config.py").write_text("import rankwise.data\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    assert upward_imports() == ["config -> rankwise.data", "train/loss -> rankwise.recipes.train"]
