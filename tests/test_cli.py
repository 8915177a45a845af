import subprocess
import sys

import pytest

from tether.cli import SUBCOMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name):
    r = subprocess.run([sys.executable, "-m", "tether.cli", name, "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        main(["fly"])


def test_unknown_benchmark_suggests_the_nearest(capsys):
    from tether.bench import main as bench
    assert bench(["runtme"]) == 2
    assert "did you mean 'runtime'" in capsys.readouterr().err
