"""scripts/mutants.py stays runnable: every planted bug still finds its snippet exactly once in today's source,
and every test it is checked against still exists (a renamed test or a rewritten line would otherwise make
the mutation check stop, unnoticed until someone runs it)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_still_applies_and_names_an_existing_test():
    mutants = _mutants()
    assert len(mutants) >= 19
    for m in mutants:
        source = (ROOT / "src" / m.file).read_text()
        assert source.count(m.old) == 1, (m.file, m.old)
        assert m.new != m.old
        path, _, name = m.test.partition("::")
        function = name.split("[")[0]
        assert re.search(rf"^def {re.escape(function)}\(", (ROOT / path).read_text(), re.M), m.test
