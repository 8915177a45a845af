"""The ``tether`` command. Subcommands are registered as ``"module:function"`` strings and
imported only when run, so ``tether robot`` never imports torch and ``--help`` is instant."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "fleet": ("sim.fleet:main", "run a learner and a simulated fleet on loopback (the main job)"),
    "learner": ("learner.server:main", "run the cloud learner service (ingest, trainer, registry)"),
    "robot": ("runtime.node:main", "run one robot's inference node"),
    "pretrain": ("learner.pretrain:main", "behaviour-clone the reference VLA on scripted demos"),
    "inspect": ("tether.inspect:main", "verify a policy artifact and print its manifest"),
    "keys": ("learner.signing:main", "create the learner's ed25519 signing keys; sign an artifact"),
    "certs": ("learner.certs:main", "create the fleet CA and mutual-TLS certificates (robots, "
                                    "learner, operators)"),
    "ros": ("runtime.ros.cli:main", "run the ROS 2 node over cyclonedds (no ROS install needed)"),
    "export": ("learner.export_lerobot:main", "export fleet experience as a LeRobotDataset v3"),
    "bench": ("tether.bench:main", "run a benchmark and write its JSON (tether bench NAME --out F)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tether", description="Tether: robot runtime with an online learning loop.",
        epilog="Run `tether COMMAND --help` for a command's options.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(SUBCOMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    module, _, func = SUBCOMMANDS[args.command][0].partition(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ImportError as e:
        extra = "sim" if module.startswith("sim") else "learner"
        print(f"tether {args.command}: missing dependency {e.name!r}; install the extra: "
              f"pip install 'tether[{extra}]'", file=sys.stderr)
        return 2
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
