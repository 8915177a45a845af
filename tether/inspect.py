"""``tether inspect ARTIFACT``: verify hashes and print the manifest (robot side, no torch)."""
from __future__ import annotations

import argparse
import sys

from runtime.artifact import ArtifactError, verify_artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether inspect", description=__doc__)
    parser.add_argument("artifact", help="policy artifact directory (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        manifest = verify_artifact(args.artifact)
    except (ArtifactError, OSError) as e:
        print(f"tether inspect: {e}", file=sys.stderr)
        return 1
    print(manifest.to_json())
    print(f"ok: version {manifest.version}, {len(manifest.files)} file(s) match their sha256",
          file=sys.stderr)
    return 0
