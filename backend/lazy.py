"""Package exports resolved on first use (PEP 562).

The engine and model packages re-export their public names for convenience, but an eager
``__init__`` would import torch into every process that touches any of their torch-free
modules (``engine.layout``, ``engine.errors``, ``models.config``): preprocessing, the BLS
model and session_control only validate and route requests, and torch costs each of those
Triton stubs ~135 MiB (PSS: preprocessing went from 191 to 57 MiB, the BLS model from 161 to 24).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each public name to the
    submodule defining it; the first access imports that submodule and caches the value."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
