"""For colcon's ament_python build only; pip reads pyproject.toml (metadata, dependencies and
console scripts live there). Adds the ament index marker, package.xml, launch and config files
to share/tether."""
import glob

from setuptools import setup

setup(data_files=[
    ("share/ament_index/resource_index/packages", ["resource/tether"]),
    ("share/tether", ["package.xml"]),
    ("share/tether/launch", sorted(glob.glob("launch/*_launch.py"))),
    ("share/tether/config", sorted(glob.glob("launch/config/*.yaml"))),
])
