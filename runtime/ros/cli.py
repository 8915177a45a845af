"""``tether ros``: the ROS 2 inference node on the cyclonedds transport (no ROS installation).

    tether ros --params launch/config/robot.yaml [--set artifact=/opt/policy] [--domain 7]

Reads the same parameter file as the launch file, configures (loads and warms up the policy) and
activates; SIGINT/SIGTERM deactivate (hold), clean up and exit 0. With a ROS 2 installation, run
the lifecycle node instead: ``ros2 launch tether robot_launch.py``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import yaml

from runtime.ros.params import RosParams, load_params_file


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tether ros", description=__doc__.split("\n")[0])
    p.add_argument("--params", default=None, help="ROS 2 parameter file (launch/config/robot.yaml)")
    p.add_argument("--node-name", default="tether_robot", help="node name (section of --params)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (YAML value), e.g. --set control_rate_hz=10.0")
    p.add_argument("--domain", type=int, default=None, help="DDS domain (default ROS_DOMAIN_ID)")
    p.add_argument("--seconds", type=float, default=None, help="run time (default: until stopped)")
    p.add_argument("--inactive", action="store_true", help="configure only; do not activate")
    return p.parse_args(argv)


def build_params(args) -> RosParams:
    params = load_params_file(args.params, args.node_name) if args.params else RosParams()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"tether ros: --set wants KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value) if value else ""
    if overrides:
        import dataclasses
        merged = {**dataclasses.asdict(params), **overrides}
        params = RosParams.from_mapping(merged)
    return params


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    params = build_params(args)
    try:
        from runtime.ros.transport_dds import DdsTransport
    except ImportError as e:
        print(f"tether ros: needs {e.name!r}; install the extra: pip install 'tether[dds]'",
              file=sys.stderr)
        return 2
    from runtime.ros.node_core import RosNodeCore
    transport = DdsTransport(args.domain)
    core = RosNodeCore(params, transport, args.node_name)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    core.configure()
    if not args.inactive:
        core.activate()
    stop.wait(args.seconds)
    core.shutdown()
    transport.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
