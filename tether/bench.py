"""``tether bench NAME --out FILE.json``: benchmarks, each measured side by side in one run.

Benchmarks are registered as ``"module:function"`` strings and imported only when run.
"""
from __future__ import annotations

import argparse
import sys

from tether.names import resolve

BENCHES: dict[str, str] = {
    "runtime": "sim.bench_runtime:main",
    "verifier": "sim.bench_verifier:main",
    "learner": "sim.bench_learner:main",
    "backends": "sim.bench_backends:main",
    "tls": "sim.bench_tls:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tether bench", description=__doc__.split("\n\n")[0],
                                     epilog="Run `tether bench NAME --help` for a benchmark's options.")
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(BENCHES)) or '(none yet)'}")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    try:
        entry = resolve(BENCHES, argv[0], "benchmark", "install the extras: pip install 'tether[all]'")
    except (ValueError, ImportError) as e:
        print(f"tether bench: {e}", file=sys.stderr)
        return 2
    return int(entry(argv[1:]) or 0)
