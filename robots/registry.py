"""Robot drivers registered by name as ``"module:Class"`` strings, imported only when chosen,
so that choosing a real robot never imports the simulator and vice versa."""
from __future__ import annotations

from robots.base import Robot
from tether.names import resolve

ROBOTS = {
    "metaworld": "sim.metaworld_robot:MetaWorldRobot",
}


def make_robot(kind: str, **kwargs) -> Robot:
    cls = resolve(ROBOTS, kind, "robot kind", "install the extra: pip install 'tether[sim]'")
    return cls(**kwargs)
