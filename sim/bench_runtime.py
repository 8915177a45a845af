"""``tether bench runtime --out FILE.json``: the on-robot runtime measured side by side.

1. ``control_loop``: a Meta-World robot at ``--rate`` Hz (50) on the wall clock for ``--seconds``
   (60) with the reference policy inferring concurrently on the worker thread: ticks, deadline
   misses, stall ticks (underruns), jitter (|tick start - deadline|) p50/p99/max in ms.
   ``control_loop_loaded``: the same loop for ``--loaded-seconds`` (20) while a busy process per
   core competes for the CPU, as a normal thread and then under SCHED_FIFO (``--rt-priority``).
2. ``async_vs_sync``: asynchronous against synchronous execution on simulated tasks on a virtual
   clock, at 0/100/200/300 ms inference latency, every merge strategy (sim/bench_async.py).
3. ``overhead``: the node's per-chunk path (observation -> feeds -> backend -> sampling -> gate ->
   queued chunk) against a bare ONNX Runtime session on the same artifact and inputs.
4. ``backends``: p50/p99 latency of each backend available here (ONNX Runtime CPU, torch CPU;
   TensorRT and the CUDA providers on a GPU machine).

``--quick`` shortens everything (about two minutes) for a smoke run; the defaults follow issue 3.
The reference policy is the pretrained reference VLA (cached under ``--cache``), with a chunk
horizon of ``--horizon`` ticks (16 by default: at 25 Hz a 300 ms delay is 8 ticks, and
``d <= s <= H - d`` needs H >= 16).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time


from runtime.artifact import write_atomic
from runtime.chunks import STRATEGIES, ActionQueue
from runtime.clock import VirtualClock, WallClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from runtime.policy import PolicyRunner
from runtime.status import LatencyWindow
from verifier.envelope import Envelope
from verifier.gate import ChunkGate


def _ms(window: LatencyWindow) -> dict:
    return {"p50": round(1e3 * window.quantile(0.5), 3), "p99": round(1e3 * window.quantile(0.99), 3)}


def control_loop(artifact, seconds: float, rate_hz: float, task: str, switch_s: float,
                 rt_priority: int | None = None) -> dict:
    from runtime.priority import realtime, worker_rt_priority
    from sim.metaworld_robot import MetaWorldRobot

    sys.setswitchinterval(switch_s)  # the control thread gets the GIL back within this
    clock = WallClock()
    robot = MetaWorldRobot(task, seed=7, clock=clock)
    policy = PolicyRunner(artifact, seed=7)
    policy.warmup(5)
    queue = ActionQueue(policy.action_dim)
    envelope = Envelope(robot.describe())
    worker = InferenceWorker(policy, queue, clock, rate_hz=rate_hz, gate=ChunkGate(envelope),
                             initial_latency_s=policy.latency["total"].quantile(0.95)
                             ).start(rt_priority=worker_rt_priority(rt_priority))
    loop = ControlLoop(robot, queue, envelope, clock, rate_hz, worker=worker,
                       to_command=worker.to_command, from_command=worker.from_command)
    try:
        with realtime(rt_priority) as (rt_refused, sched):  # this thread ticks
            loop.run(seconds)
    finally:
        worker.stop()
        robot.close()
    s = loop.stats()
    # the first chunk of each episode is inferred after its reset: those holds are by design
    return {"rate_hz": rate_hz, "seconds": seconds, "ticks": s["ticks"],
            "deadline_misses": s["deadline_misses"], "stall_ticks": s["stall_ticks"],
            "episodes": loop.episodes, "chunks": worker.chunks,
            "switch_interval_ms": switch_s * 1e3, "sched": list(sched),
            **({"rt_refused": rt_refused} if rt_refused else {}),
            "jitter_ms": {"p50": s["jitter_p50_ms"], "p99": s["jitter_p99_ms"],
                          "max": s["jitter_max_ms"]},
            "inference_ms": policy.latency_stats()}


def overhead(artifact, n: int) -> dict:
    import onnxruntime as ort

    policy = PolicyRunner(artifact, seed=3, backend_options={"intra_op_num_threads": 1})
    obs = policy.synthetic_observation()
    clock = VirtualClock()
    queue = ActionQueue(policy.action_dim)
    envelope = Envelope(_description(policy))
    worker = InferenceWorker(policy, queue, clock, rate_hz=25.0, gate=ChunkGate(envelope),
                             threaded=False, simulated_latency_s=0.0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    bare = ort.InferenceSession(str(pathlib.Path(artifact) / "policy.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    feeds = policy.feeds(obs)
    node_w, bare_w = LatencyWindow(n), LatencyWindow(n)
    for i in range(n + 20):  # interleaved, so drift on a shared machine hits both alike
        queue.reset(i + 1)
        worker.reset(i + 1)
        t0 = time.perf_counter()
        worker.maybe_request(0, obs)
        t1 = time.perf_counter()
        bare.run(None, feeds)
        t2 = time.perf_counter()
        if i >= 20:
            node_w.add(t1 - t0)
            bare_w.add(t2 - t1)
    if worker.chunks < n:
        raise RuntimeError(f"overhead: only {worker.chunks} of {n + 20} requests were queued")
    node, b = node_w.quantile(0.5), bare_w.quantile(0.5)
    return {"node_ms_p50": round(node * 1e3, 4), "bare_ms_p50": round(b * 1e3, 4),
            "ratio": round(node / b, 4), "samples": n,
            "node_stages_ms": policy.latency_stats()}


def loaded(artifact, seconds: float, rate_hz: float, task: str, switch_s: float,
           rt_priority: int) -> list[dict]:
    """The control loop while one busy process per core competes for the CPU: as a normal
    thread, then under SCHED_FIFO (runtime/priority.py), side by side."""
    import os
    import subprocess

    runs = []
    for rt in (None, rt_priority):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 2)]
        try:
            time.sleep(0.5)
            runs.append({"rt_priority": rt, "busy_processes": len(hogs),
                         **control_loop(artifact, seconds, rate_hz, task, switch_s, rt)})
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    return runs


def _description(policy):
    from robots.description import load_description

    return load_description(policy.manifest.robot)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether bench runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    p.add_argument("--seconds", type=float, default=None, help="control-loop run (default 60)")
    p.add_argument("--rate", type=float, default=50.0, help="control-loop rate in Hz")
    p.add_argument("--episodes", type=int, default=None, help="episodes per task and condition")
    p.add_argument("--horizon", type=int, default=16, help="reference policy chunk horizon H")
    p.add_argument("--latencies", default="0,100,200,300", help="inference latencies in ms")
    p.add_argument("--cache", default=".tether-cache/pretrained")
    p.add_argument("--loaded-seconds", type=float, default=None,
                   help="control loop with a busy process per core, normal then real-time "
                        "(default 20 s; 0 skips it)")
    p.add_argument("--rt-priority", type=int, default=80,
                   help="SCHED_FIFO priority for the loaded real-time run")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="Python GIL switch interval during the control-loop run")
    a = p.parse_args(argv)
    from learner.pretrain import ensure_pretrained
    from sim.bench_async import compare
    from sim.tasks import DEFAULT_TASKS

    seconds = a.seconds or (10.0 if a.quick else 60.0)
    episodes = a.episodes or (2 if a.quick else 10)
    artifact = ensure_pretrained(DEFAULT_TASKS, a.cache, horizon=a.horizon)
    t0 = time.monotonic()
    result = {"artifact": str(artifact), "horizon": a.horizon, "host": platform.node(),
              "machine": platform.processor() or platform.machine(),
              "command": "tether bench runtime " + " ".join(argv or sys.argv[1:])}
    result["control_loop"] = control_loop(artifact, seconds, a.rate, DEFAULT_TASKS[0],
                                          a.switch_interval_ms / 1e3)
    print(f"bench runtime: control loop {result['control_loop']}", flush=True)
    loaded_s = a.loaded_seconds if a.loaded_seconds is not None else (5.0 if a.quick else 20.0)
    if loaded_s > 0:
        result["control_loop_loaded"] = loaded(artifact, loaded_s, a.rate, DEFAULT_TASKS[0],
                                               a.switch_interval_ms / 1e3, a.rt_priority)
        print(f"bench runtime: control loop under load {result['control_loop_loaded']}",
              flush=True)
    result["overhead"] = overhead(artifact, 100 if a.quick else 500)
    print(f"bench runtime: overhead {result['overhead']}", flush=True)
    # the same measure on the >= 100M-parameter policy: where inference dominates the chunk
    import tempfile

    from sim.bench_backends import make_artifact, measure

    with tempfile.TemporaryDirectory() as tmp:
        large = make_artifact(pathlib.Path(tmp), "large")
        result["overhead_large"] = overhead(large, 30 if a.quick else 100)
    print(f"bench runtime: overhead (104M-parameter policy) {result['overhead_large']}", flush=True)
    result["backends"] = measure(artifact, "reference", 50 if a.quick else 300)
    print(f"bench runtime: backends {result['backends']}", flush=True)
    sync_settings = (lambda h: [h // 2, h]) if a.quick else (lambda h: [h // 4, h // 2, h])
    rows, sweep = compare(artifact, DEFAULT_TASKS, episodes,
                          [float(x) for x in a.latencies.split(",")], list(STRATEGIES),
                          sync_settings, log=lambda m: print(m, flush=True))
    result["async_vs_sync"], result["sync_sweep"] = rows, sweep
    result["summary"] = summarize(rows)
    result["seconds_total"] = round(time.monotonic() - t0, 1)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result["summary"], indent=2))
    return 0


def summarize(rows: list[dict]) -> dict:
    """Per latency: each async strategy against the zero-latency run of the same strategy and
    against the best synchronous run (async/sync completion-time ratio)."""
    def find(lat, strategy, mode):
        return next((r for r in rows if r["latency_ms"] == lat and r["strategy"] == strategy
                     and r["mode"] == mode), None)
    out = {}
    for r in rows:
        if r["mode"] != "async":
            continue
        base = find(0.0, r["strategy"], "async") or find(0, r["strategy"], "async")
        sync = next((s for s in rows if s["latency_ms"] == r["latency_ms"]
                     and s["mode"] == "sync"), None)
        ct, bt = r["completion_time_s"], base and base["completion_time_s"]
        key = f"{r['strategy']}@{r['latency_ms']:g}ms"
        out[key] = {
            "completion_vs_zero_latency": round(ct / bt, 4) if ct and bt else None,
            "success_points_vs_zero_latency": (round(100 * (r["success_rate"] - base["success_rate"]), 1)
                                               if base else None),
            "async_over_sync_time": (round(r["episode_time_s"] / sync["episode_time_s"], 4)
                                     if sync else None),
            "async_over_sync_completion": (round(ct / sync["completion_time_s"], 4)
                                           if sync and ct and sync["completion_time_s"] else None)}
    return out


if __name__ == "__main__":
    sys.exit(main())
