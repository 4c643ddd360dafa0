"""Import every module of a registry package so its entries register themselves.

A new method, optimizer or hook is one new file: in its package here, or in any installed package
that names the file under the entry-point group of that registry (`rankwise.methods`,
`rankwise.optim`, `rankwise.hooks`), e.g. in its pyproject.toml:

    [project.entry-points."rankwise.methods"]
    bitfit = "my_package.bitfit"

Nothing else is edited. Names a module here lists in `__all__` are re-exported by the package
(e.g. `rankwise.optim.LoFT`).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil


def discover(package_name: str, package_path, namespace: dict) -> None:
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
    load_installed(package_name)


def load_installed(group: str) -> list[str]:
    """Import the modules installed packages name under entry-point `group`; their names, sorted."""
    names = []
    for point in sorted(importlib.metadata.entry_points(group=group), key=lambda p: p.name):
        importlib.import_module(point.value.split(":")[0])
        names.append(point.name)
    return names
