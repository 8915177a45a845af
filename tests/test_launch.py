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
