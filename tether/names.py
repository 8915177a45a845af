"""Implementations registered by name as ``"module:attr"`` strings, imported only when chosen.

Shared by robot drivers, policy backends and benchmarks: an unknown name gets the nearest known
one; a missing optional dependency says which package is missing and how to install it.
"""
from __future__ import annotations

import difflib
import importlib


def resolve(table: dict[str, str], name: str, what: str, install_hint: str = ""):
    """The attribute registered as ``name`` in ``table`` (``{name: "module:attr"}``)."""
    if name not in table:
        near = difflib.get_close_matches(name, table, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown {what} {name!r}{hint} (known: {sorted(table)})")
    module, _, attr = table[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} {name!r} needs {e.name!r}; {install_hint}".rstrip("; ")) from e
    return getattr(mod, attr)
