"""``tether bench NAME --out FILE.json``: benchmarks, each measured side by side in one run.

Benchmarks are registered as ``"module:function"`` strings and imported only when run.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys

BENCHES: dict[str, str] = {
    "runtime": "sim.bench_runtime:main",
    "verifier": "sim.bench_verifier:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tether bench", description=__doc__.split("\n\n")[0],
                                     epilog="Run `tether bench NAME --help` for a benchmark's options.")
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(BENCHES)) or '(none yet)'}")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in BENCHES:
        near = difflib.get_close_matches(name, BENCHES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        print(f"tether bench: unknown benchmark {name!r}{hint} (known: {sorted(BENCHES)})",
              file=sys.stderr)
        return 2
    module, _, func = BENCHES[name].partition(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
