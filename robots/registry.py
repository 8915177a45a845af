"""Robot drivers registered by name as ``"module:Class"`` strings, imported only when chosen,
so that choosing a real robot never imports the simulator and vice versa."""
from __future__ import annotations

import difflib
import importlib

from robots.base import Robot

ROBOTS = {
    "metaworld": "sim.metaworld_robot:MetaWorldRobot",
}


def make_robot(kind: str, **kwargs) -> Robot:
    if kind not in ROBOTS:
        near = difflib.get_close_matches(kind, ROBOTS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown robot kind {kind!r}{hint} (known: {sorted(ROBOTS)})")
    module, _, cls = ROBOTS[kind].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"robot kind {kind!r} needs {e.name!r}; install the extra: "
                          f"pip install 'tether[sim]'") from e
    return getattr(mod, cls)(**kwargs)
