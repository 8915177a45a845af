"""``tether bench tls --out FILE.json``: what mutual TLS costs, plaintext and mTLS side by side
against one in-process learner service each (real gRPC on loopback, real certificates):

- ``connect``: a new channel until ready (TCP + TLS 1.3 handshake with both certificates);
- ``push``: PushExperience round trips of one 8-record batch (48x48 image each), durable ack;
- ``stream``: StreamExperience throughput, 200 such batches on one stream;
- ``certs``: ``tether certs`` issuing one robot certificate (key, signature, fsyncs).

Rounds alternate the two modes so that a machine busy with something else hurts both alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from runtime.artifact import write_atomic

RECORDS = 8


def _batch(robot: str, batch_seq: int, first_seq: int, rng) -> "object":
    from runtime.tensors import to_proto
    from tether.wire import tether_pb2 as pb
    return pb.ExperienceBatch(robot_id=robot, batch_seq=batch_seq, records=[pb.ChunkRecord(
        robot_id=robot, episode_id=f"e{batch_seq}", seq=first_seq + k, policy_version=1,
        task="reach", observation=pb.Observation(
            images={"front": to_proto(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))},
            state=to_proto(rng.normal(size=4).astype(np.float32)), instruction="reach",
            timestamp=float(k)),
        prefix=to_proto(np.zeros((8, 4), np.float32)), prefix_len=0,
        actions=to_proto(rng.uniform(-1, 1, (2, 4)).astype(np.float32)), offsets=[0, 1],
        behaviour_log_prob=-3.0) for k in range(RECORDS)])


def _quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(1e3 * statistics.median(xs), 3),
            "p99_ms": round(1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3), "n": len(xs)}


def run(rounds: int, connects: int, pushes: int, work: pathlib.Path) -> dict:
    import grpc

    from learner import certs
    from learner.auth import ServerTls
    from learner.registry import Registry
    from learner.service import serve
    from learner.store import ExperienceStore
    from runtime.stream import insecure_channel
    from runtime.tls import TlsConfig
    from tether.wire import tether_pb2_grpc as pb_grpc

    certs.init_ca(work / "ca", force=True)
    t = time.perf_counter()
    robot = certs.issue(work / "ca", certs.ROBOT, "robot-0", work / "robot-0", force=True)
    issue_s = time.perf_counter() - t
    srv = certs.issue(work / "ca", certs.LEARNER, "learner", work / "learner",
                      hosts=certs.DEFAULT_HOSTS, force=True)
    modes = {"plaintext": (None, insecure_channel),
             "mtls": (ServerTls(str(srv.cert), str(srv.key), str(srv.ca)),
                      TlsConfig(str(robot.cert), str(robot.key), str(robot.ca)).channel_factory())}
    samples = {m: {"connect": [], "push": [], "stream_records_per_s": []} for m in modes}
    rng = np.random.default_rng(0)
    seq = {m: 0 for m in modes}
    for r in range(rounds):
        for mode, (tls, factory) in modes.items():
            d = work / f"{mode}-{r}"
            store = ExperienceStore(d / "exp.sqlite")
            registry = Registry(d / "reg")
            server, port = serve("127.0.0.1:0", store, registry, tls=tls)
            addr = f"127.0.0.1:{port}"
            try:
                for _ in range(connects):
                    t = time.perf_counter()
                    channel = factory(addr)
                    grpc.channel_ready_future(channel).result(timeout=10)
                    samples[mode]["connect"].append(time.perf_counter() - t)
                    channel.close()
                channel = factory(addr)
                stub = pb_grpc.LearnerStub(channel)
                for b in range(pushes):
                    batch = _batch("robot-0", b, seq[mode], rng)
                    seq[mode] += RECORDS
                    t = time.perf_counter()
                    stub.PushExperience(batch, timeout=30)
                    samples[mode]["push"].append(time.perf_counter() - t)
                batches = [_batch("robot-0", pushes + b, seq[mode] + b * RECORDS, rng)
                           for b in range(200)]
                seq[mode] += 200 * RECORDS
                t = time.perf_counter()
                acked = sum(1 for _ in stub.StreamExperience(iter(batches), timeout=120))
                samples[mode]["stream_records_per_s"].append(
                    acked * RECORDS / (time.perf_counter() - t))
                channel.close()
            finally:
                registry.close()
                server.stop(1).wait()
                store.close()
    out = {"batch_bytes": _batch("robot-0", 0, 0, rng).ByteSize(), "records_per_batch": RECORDS,
           "certs": {"issue_robot_ms": round(1e3 * issue_s, 2)}}
    for mode, s in samples.items():
        out[mode] = {"connect": _quantiles(s["connect"]), "push": _quantiles(s["push"]),
                     "stream_records_per_s": round(statistics.median(s["stream_records_per_s"]))}
    out["mtls_over_plaintext"] = {
        "connect_p50": round(out["mtls"]["connect"]["p50_ms"] / out["plaintext"]["connect"]["p50_ms"], 2),
        "push_p50": round(out["mtls"]["push"]["p50_ms"] / out["plaintext"]["push"]["p50_ms"], 2),
        "stream": round(out["mtls"]["stream_records_per_s"] / out["plaintext"]["stream_records_per_s"], 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether bench tls", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both modes")
    p.add_argument("--connects", type=int, default=30, help="new connections per round")
    p.add_argument("--pushes", type=int, default=150, help="PushExperience calls per round")
    a = p.parse_args(argv)
    logging.getLogger("tether.learner.service").setLevel(logging.ERROR)  # plaintext warnings
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tether-bench-tls-") as work:
        result = {"host": platform.node(), "machine": platform.processor() or platform.machine(),
                  "command": "tether bench tls " + " ".join(argv or sys.argv[1:]),
                  **run(a.rounds, a.connects, a.pushes, pathlib.Path(work))}
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))
    return 0
