"""Fold the rows the fault tests wrote into ``faults.json`` and print the README table.

``python -m tests.faults.collect --out faults.json`` (``make faults`` runs it after the tests).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from tests.faults.report import FIELDS, rows_path


def collect(rows_file: pathlib.Path) -> list[dict]:
    latest: dict[str, dict] = {}
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        if line.strip():
            row = json.loads(line)
            latest[row["fault"]] = row  # the last run of each fault kind wins
    return sorted(latest.values(), key=lambda r: r["time"])


def table(rows: list[dict]) -> str:
    head = "| fault | injected | sent | stored | lost | duplicated | robot stops |"
    lines = [head, "|" + " --- |" * 7]
    lines += ["| " + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])
                                for k in FIELDS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.collect", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="faults.json")
    p.add_argument("--rows", default=None, help="rows file (default: $TETHER_FAULTS_DIR/rows.jsonl)")
    a = p.parse_args(argv)
    rows = collect(pathlib.Path(a.rows) if a.rows else rows_path())
    if not rows:
        print("no fault rows found: run the fault tests first (make faults)", file=sys.stderr)
        return 1
    pathlib.Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {a.out} ({len(rows)} fault kinds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
