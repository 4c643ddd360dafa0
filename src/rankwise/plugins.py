"""Import every module of a registry package so its entries register themselves.

A new method, optimizer or hook is one new file in its package: nothing else is edited. Names a
module lists in `__all__` are re-exported by the package (e.g. `rankwise.optim.LoFT`).
"""
from __future__ import annotations

import importlib
import pkgutil


def discover(package_name: str, package_path, namespace: dict) -> None:
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
