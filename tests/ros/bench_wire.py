"""Wire-path benchmark: the ROS 2 node on cyclonedds against the fake arm process (loopback).

    .venv/bin/python -m tests.ros.bench_wire --seconds 10 --out runs/ros_wire.json

Reports command rate, inter-arrival p50/p99/max of the trajectories the arm received, control
jitter p99 and inference p95 (from the node's diagnostics), and the time from the camera going
silent to the hold (max_age_s plus at most one tick is the target).
"""
import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from runtime.ros.transport_dds import LOOPBACK_URI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ["CYCLONEDDS_URI"] = LOOPBACK_URI
    import torch
    torch.set_num_threads(1)
    from runtime.ros.node_core import RosNodeCore
    from runtime.ros.params import RosParams
    from runtime.ros.transport_dds import DdsTransport
    from tests.ros.helpers import export_arm7_artifact
    from tests.ros.test_dds_node import Arm, Diagnostics

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-ros-bench-"))
    export_arm7_artifact(tmp / "policy")
    from tests.doubles import public_key_for_tests
    params = RosParams(artifact=str(tmp / "policy"), spool=str(tmp / "spool"), max_age_s=0.2,
                       trusted_keys=public_key_for_tests())
    arm, diag = Arm(tmp), Diagnostics()
    transport = DdsTransport(diag.t.domain_id)
    core = RosNodeCore(params, transport)
    try:
        t0 = time.perf_counter()
        core.configure()
        configure_s = time.perf_counter() - t0
        core.activate()
        diag.wait_for("commanding")
        t_start = time.time()
        time.sleep(a.seconds)
        t_end = time.time()
        _, _, values = diag.last()
        arm.send("camera off")
        t_off = time.time()
        diag.wait_for("hold")
        time.sleep(0.5)
        hold_t = max(c["t"] for c in arm.commands() if c["t"] < t_off + 1.0)
        cmds = [c for c in arm.commands() if t_start <= c["t"] < t_end]
        gaps = np.diff([c["t"] for c in cmds]) * 1e3
        result = {
            "seconds": a.seconds, "control_rate_hz": 1 / core.node.loop.period,
            "configure_s": round(configure_s, 3), "commands": len(cmds),
            "commands_per_s": round(len(cmds) / a.seconds, 2),
            "interarrival_ms": {"p50": round(float(np.percentile(gaps, 50)), 2),
                                "p99": round(float(np.percentile(gaps, 99)), 2),
                                "max": round(float(gaps.max()), 2)},
            "control_jitter_p99_ms": float(values["jitter_p99_ms"]),
            "inference_p95_ms": float(values["inference_p95_ms"]),
            "stall_ticks": int(values["stall_ticks"]),
            "camera_silent_to_hold_ms": round(1e3 * (hold_t - t_off), 1),
            "max_age_s": params.max_age_s, "max_skew_s": params.max_skew_s,
        }
        core.deactivate()
        core.cleanup()
    finally:
        core.shutdown()
        transport.shutdown()
        diag.t.shutdown()
        arm.close()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
