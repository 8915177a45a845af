"""Launch files are checked without a ROS installation: they parse, define
generate_launch_description, declare the arguments they use, and run real subcommands."""
import ast
import pathlib

import pytest

from tether.cli import SUBCOMMANDS

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*_launch.py")), ids=lambda p: p.name)
def test_launch_file_declares_what_it_uses(path):
    tree = ast.parse(path.read_text())
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    declared = {c.args[0].value for c in calls if c.func.id == "DeclareLaunchArgument"}
    used = {c.args[0].value for c in calls if c.func.id == "LaunchConfiguration"}
    assert used and used <= declared, f"undeclared: {used - declared}"
    cmds = [c for c in calls if c.func.id == "ExecuteProcess"]
    for c in cmds:
        cmd = next(k.value for k in c.keywords if k.arg == "cmd")
        assert cmd.elts[0].value == "tether" and cmd.elts[1].value in SUBCOMMANDS


ROOT = LAUNCH.parent


def _calls(path, name):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def test_robot_launch_runs_the_lifecycle_node_of_this_package():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+")
    path = LAUNCH / "robot_launch.py"
    nodes = _calls(path, "LifecycleNode")
    assert len(nodes) == 1
    kw = {k.arg: k.value for k in nodes[0].keywords}
    assert kw["package"].value == "tether"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    exe = kw["executable"].value
    assert exe in scripts, f"{exe} is not a console script in pyproject.toml"
    module, _, func = scripts[exe].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    assert f"def {func}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    declared = {c.args[0].value for c in _calls(path, "DeclareLaunchArgument")}
    assert {"params_file", "artifact", "learner", "autostart"} <= declared
    # the launch file's default parameter file is installed from launch/config
    assert (LAUNCH / "config" / "robot.yaml").exists()


def test_ament_python_package_metadata_installs_launch_and_config():
    import xml.etree.ElementTree as ET
    pkg = ET.parse(ROOT / "package.xml").getroot()
    assert pkg.get("format") == "3" and pkg.findtext("name") == "tether"
    assert pkg.find("export/build_type").text == "ament_python"
    deps = {d.text for d in pkg.iter("exec_depend")}
    assert {"rclpy", "launch_ros", "sensor_msgs", "trajectory_msgs", "diagnostic_msgs",
            "lifecycle_msgs"} <= deps
    assert (ROOT / "resource" / "tether").exists()
    cfg = (ROOT / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/tether" in cfg and "script_dir=$base/lib/tether" in cfg
    setup_py = (ROOT / "setup.py").read_text()
    for needed in ("resource/tether", "package.xml", "launch/*_launch.py", "launch/config/*.yaml",
                   "share/ament_index/resource_index/packages"):
        assert needed in setup_py
    assert list(LAUNCH.glob("*_launch.py")) and list((LAUNCH / "config").glob("*.yaml"))
