"""Benchmark part 1: durable ingest from 16 concurrent robot streams into a real learner.

A ``tether learner --no-train`` process serves; client processes (so the clients do not share
the learner's GIL) each run several ``StreamExperience`` streams with a window of batches in
flight, sending batches serialized before the clock starts, so what is measured is the learner:
validation, group commit (segment fsync + catalog commit) and the acks. "Transitions" are
ChunkRecords, one per executed action chunk (small observations: 2 cameras of 16x16x3, a state
of 39 floats, 4x4 actions). Afterwards the store is read back: ``lost`` counts acknowledged
records missing from it, ``duplicated`` records stored more than once.

    .venv/bin/python -m sim.bench_ingest [--streams 16] [--seconds 20] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from runtime.tensors import to_proto
from tether.wire import tether_pb2 as pb

CAMERAS = ("front", "wrist")
IMAGE_HW = (16, 16)
STATE_DIM = 39
CHUNK = (4, 4)  # executed actions x action dim
EPISODE_RECORDS = 50
TEMPLATES = 64
CLIENT_WINDOW = 8
PREBUILT_RATE = 40_000  # records/s the prebuilt batches can feed (twice the goal)
METHOD = "/tether.v1.Learner/StreamExperience"


def _templates(seed: int) -> list[pb.ChunkRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(TEMPLATES):
        out.append(pb.ChunkRecord(
            policy_version=1, weight_sha256="0" * 64, task="reach-v3",
            observation=pb.Observation(
                images={c: to_proto(rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8))
                        for c in CAMERAS},
                state=to_proto(rng.normal(size=STATE_DIM).astype(np.float32)),
                instruction="reach the goal"),
            prefix=to_proto(np.zeros((8, CHUNK[1]), np.float32)), prefix_len=0,
            actions=to_proto(rng.uniform(-1, 1, CHUNK).astype(np.float32)),
            offsets=list(range(CHUNK[0])), behaviour_log_prob=-3.0, reward=0.1))
    return out


def build_batches(robot: str, n_batches: int, per_batch: int, seed: int) -> list[bytes]:
    """Serialized ExperienceBatches for one robot: seqs 0.., episodes of EPISODE_RECORDS."""
    templates = _templates(seed)
    out = []
    for b in range(n_batches):
        batch = pb.ExperienceBatch(robot_id=robot, batch_seq=b + 1)
        for k in range(per_batch):
            seq = b * per_batch + k
            r = batch.records.add()
            r.CopyFrom(templates[seq % TEMPLATES])
            r.robot_id, r.seq = robot, seq
            r.episode_id = f"ep{seq // EPISODE_RECORDS:06d}"
            r.observation.timestamp = 0.04 * seq
            last = seq % EPISODE_RECORDS == EPISODE_RECORDS - 1
            r.terminated = r.success = last and (seq // EPISODE_RECORDS) % 2 == 0
            r.truncated = last and not r.terminated
        out.append(batch.SerializeToString())
    return out


# -- the client processes ----------------------------------------------------------------------
def _run_stream(addr: str, batches: list[bytes], stop_at: float, result: dict) -> None:
    import grpc

    channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1),
                                                   ("grpc.max_send_message_length", 64 << 20)])
    call_fn = channel.stream_stream(METHOD, request_serializer=None,
                                    response_deserializer=pb.Ack.FromString)
    window = threading.Semaphore(CLIENT_WINDOW)
    sent_at: dict[int, float] = {}
    latencies, acked, nbytes = [], 0, 0

    def requests():
        for i, data in enumerate(batches):
            window.acquire()
            now = time.monotonic()
            if now >= stop_at:
                return
            sent_at[i + 1] = now
            yield data

    try:
        for ack in call_fn(requests()):
            latencies.append(time.monotonic() - sent_at[ack.batch_seq])
            nbytes += len(batches[ack.batch_seq - 1])
            acked += 1
            window.release()
    except grpc.RpcError as e:
        result["error"] = f"{e.code().name}: {e.details()}"
    result.update(sent=len(sent_at), acked=acked, bytes=nbytes, latencies=latencies,
                  exhausted=len(sent_at) == len(batches), last_ack=time.monotonic())
    channel.close()


def client_main(argv) -> int:
    p = argparse.ArgumentParser(prog="bench_ingest client")
    p.add_argument("--addr", required=True)
    p.add_argument("--robots", required=True, help="comma-separated robot ids, one stream each")
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--per-batch", type=int, required=True)
    args = p.parse_args(argv)
    robots = args.robots.split(",")
    batches = [build_batches(r, args.batches, args.per_batch, seed=i)
               for i, r in enumerate(robots)]
    print("ready", flush=True)
    start, seconds = (float(x) for x in sys.stdin.readline().split())
    time.sleep(max(0.0, start - time.time()))  # all processes start on the same wall clock
    stop_at = time.monotonic() + seconds
    results = [{"robot": r} for r in robots]
    threads = [threading.Thread(target=_run_stream, args=(args.addr, b, stop_at, res))
               for b, res in zip(batches, results)]
    t0, cpu0 = time.monotonic(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    for res in results:
        res["elapsed"] = res.pop("last_ack", t0) - t0
        res["client_cpu_s"] = cpu / len(results)  # the process's CPU, shared among its streams
    print(json.dumps(results), flush=True)
    return 0


# -- the learner process -------------------------------------------------------------------------
def _init_artifact(root: pathlib.Path) -> pathlib.Path:
    import torch

    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig

    torch.manual_seed(0)
    out = root / "pretrained"
    export_artifact(ReferenceVLA(VLAConfig()).eval(), out, version=1, parent_version=0,
                    normalization={"state_mean": [0.0] * 4, "state_std": [1.0] * 4,
                                   "action_mean": [0.0] * 4, "action_std": [1.0] * 4},
                    robot="bench", control_rate_hz=25.0)
    return out


def start_learner(data: pathlib.Path, artifact: pathlib.Path, addr: str = "127.0.0.1:0",
                  ingest_workers: int | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "learner", "--data", str(data), "--addr", addr,
         "--no-train", "--init-artifact", str(artifact), "--log-level", "WARNING",
         "--insecure"]  # loopback only: the bench measures storage, not TLS
        + ([] if ingest_workers is None else ["--ingest-workers", str(ingest_workers)]),
        stdout=subprocess.PIPE, text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    line = proc.stdout.readline()
    if not line.startswith("learner listening on "):
        proc.kill()
        raise RuntimeError(f"the learner did not start (said {line!r}); run it by hand: "
                           f"{' '.join(proc.args)}")
    return proc, line.split()[-1]


def _cpu_seconds(pid: int, children: bool = False) -> float | None:
    """User + system CPU time of a process so far (Linux), for CPU per transition; with
    ``children``, plus that of its live child processes (the ingest validators)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if children:
            for kids in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
                total += sum(_cpu_seconds(int(k)) or 0.0 for k in kids.read_text().split())
        return total
    except (OSError, ValueError, IndexError):
        return None


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy so far (Linux /proc/stat), for the machine's load."""
    try:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0]
                  .split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # - idle, iowait
    except (OSError, ValueError, IndexError):
        return None


def _read_back(store_dir: pathlib.Path) -> tuple[int, dict[str, np.ndarray]]:
    """(rows, {robot: sorted seqs}) of a store, read-only."""
    from learner.store import ExperienceStore

    store = ExperienceStore(store_dir, readonly=True)
    seqs: dict[str, list] = {}
    rows = 0
    try:
        for table in store.scan(["robot_id", "seq"]):
            rows += table.num_rows
            for robot, s in zip(table.column("robot_id").to_pylist(),
                                table.column("seq").to_pylist()):
                seqs.setdefault(robot, []).append(s)
    finally:
        store.close()
    return rows, {r: np.sort(np.asarray(s)) for r, s in seqs.items()}


def run_ingest(streams: int = 16, seconds: float = 20.0, records_per_batch: int = 64,
               work_dir=None, client_processes: int = 4,
               ingest_workers: int | None = None) -> dict:
    """Measure durable ingest; see the module docstring. Returns the ``ingest`` JSON block."""
    if streams < 1 or seconds <= 0 or records_per_batch < 1:
        raise ValueError(f"run_ingest needs streams >= 1, seconds > 0, records_per_batch >= 1; "
                         f"got {streams}, {seconds}, {records_per_batch}")
    root = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="tether-bench-ingest-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "learner"
    shutil.rmtree(data, ignore_errors=True)
    learner, addr = start_learner(data, _init_artifact(root), ingest_workers=ingest_workers)
    n_batches = int(PREBUILT_RATE * seconds / streams / records_per_batch) + CLIENT_WINDOW
    robots = [f"bench-{i:02d}" for i in range(streams)]
    groups = [robots[i::client_processes] for i in range(min(client_processes, streams))]
    clients = [subprocess.Popen(
        [sys.executable, "-m", "sim.bench_ingest", "--client", "--addr", addr, "--robots",
         ",".join(g), "--batches", str(n_batches), "--per-batch", str(records_per_batch)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=pathlib.Path(__file__).resolve().parents[1]) for g in groups]
    try:
        for c in clients:
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("a bench client failed while building its batches")
        start = time.time() + 0.5
        for c in clients:
            c.stdin.write(f"{start} {seconds}\n")
            c.stdin.flush()
        time.sleep(max(0.0, start - time.time()))
        cpu0, busy0, wall0 = (_cpu_seconds(learner.pid, children=True), _machine_busy_seconds(),
                              time.monotonic())
        results = []
        for c in clients:
            out, _ = c.communicate(timeout=seconds + 120)
            results += json.loads(out.strip().splitlines()[-1])
        cpu1, busy1, wall1 = (_cpu_seconds(learner.pid, children=True), _machine_busy_seconds(),
                              time.monotonic())
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        learner.send_signal(signal.SIGTERM)
        try:
            learner.wait(30)
        except subprocess.TimeoutExpired:
            learner.kill()
    rows, stored = _read_back(data / "experience")
    if work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    lost = duplicated = 0
    for res in results:
        acked_seqs = np.arange(res["acked"] * records_per_batch)
        have = stored.get(res["robot"], np.zeros(0, np.int64))
        lost += int(np.setdiff1d(acked_seqs, have).size)
        duplicated += int(have.size - np.unique(have).size)
    elapsed = max(r["elapsed"] for r in results)
    acked_records = sum(r["acked"] for r in results) * records_per_batch
    latencies = np.concatenate([np.asarray(r["latencies"]) for r in results]) * 1e3
    errors = [f"{r['robot']}: {r['error']}" for r in results if "error" in r]
    return {
        "streams": streams, "transitions_per_s": round(acked_records / elapsed, 1),
        "mb_per_s": round(sum(r["bytes"] for r in results) / elapsed / 1e6, 2),
        "ack_p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies.size else None,
        "ack_p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies.size else None,
        "lost": lost, "duplicated": duplicated,
        "records_sent": sum(r["sent"] for r in results) * records_per_batch,
        "records_acked": acked_records, "records_stored": rows, "seconds": round(elapsed, 2),
        # the learner process and its ingest validator children
        "learner_cores": (round((cpu1 - cpu0) / (wall1 - wall0), 2)
                          if cpu0 is not None and cpu1 is not None else None),
        "learner_cpu_us_per_transition": (round((cpu1 - cpu0) / acked_records * 1e6, 1)
                                          if cpu0 is not None and cpu1 is not None
                                          and acked_records else None),
        # the clients share the machine: what they burn the learner cannot have
        "machine_busy_cores": (round((busy1 - busy0) / (wall1 - wall0), 2)
                               if busy0 is not None and busy1 is not None else None),
        "client_cores": round(sum(r["client_cpu_s"] for r in results) / elapsed, 2),
        "ingest_workers": ingest_workers if ingest_workers is not None else "default",
        "records_per_batch": records_per_batch, "client_processes": len(groups),
        "client_window": CLIENT_WINDOW, "cpus": os.cpu_count(),
        "prebuilt_exhausted": any(r["exhausted"] for r in results), "errors": errors,
        "transition": "one ChunkRecord (2 cameras 16x16x3 uint8, state 39 float32, 4x4 actions)",
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--client"]:
        return client_main(argv[1:])
    p = argparse.ArgumentParser(prog="bench_ingest", description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--records-per-batch", type=int, default=64)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--ingest-workers", type=int, default=None,
                   help="the learner's --ingest-workers (default: its own default)")
    p.add_argument("--work-dir", help="where the learner's data goes (default: a temp dir)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run_ingest(args.streams, args.seconds, args.records_per_batch, args.work_dir,
                        args.client_processes, args.ingest_workers)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
