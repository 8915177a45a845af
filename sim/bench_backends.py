"""Backend latency for the reference policy and a large (>= 100M parameter) policy: issue 3,
benchmark part 4. Runs wherever it is started; on a machine without a GPU the CUDA/TensorRT rows
say why they were skipped.

Both policies are the reference VLA architecture with random weights (latency does not depend on
training): ``reference`` has the pretrained policy's shape (one 48x48 camera, H = 16, A = 4),
``large`` widens and deepens its trunk to 4096 x 7 (about 104M parameters, a 420 MB ONNX file).
Every backend is measured on the same artifact and the same inputs, one after the other, in one run.

    python -m sim.bench_backends --out runs/bench/backends.json [--n 300] [--no-large]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

from runtime.artifact import write_atomic
from runtime.backends import load_backend
from runtime.policy import PolicyRunner
from runtime.status import LatencyWindow

# (name, options) in the order measured; what cannot load here is reported with its reason
CANDIDATES = [("ort", {}), ("torch", {"device": "cpu"}),
              ("ort", {"providers": ["CUDAExecutionProvider"]}),
              ("ort", {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}),
              ("torch", {"device": "cuda"}),
              ("torch", {"device": "cuda", "cuda_graph": True}),
              ("tensorrt", {"precision": "fp16"})]

POLICIES = {
    "reference": {},
    "large": {"trunk_width": 4096, "trunk_layers": 7},
}


def make_artifact(out_dir: pathlib.Path, name: str, seed: int = 0) -> pathlib.Path:
    """A random-weight reference-VLA artifact with the pretrained policy's input shapes."""
    import torch

    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig

    torch.manual_seed(seed)
    config = VLAConfig(horizon=16, action_dim=4, state_dim=4, cameras=("front",),
                       image_hw=(48, 48), **POLICIES[name])
    model = ReferenceVLA(config)
    path = out_dir / name
    export_artifact(model, path, version=1, parent_version=0,
                    normalization={"state_mean": np.zeros(4), "state_std": np.ones(4)},
                    robot="sawyer_metaworld", control_rate_hz=25.0)
    return path


def params(artifact: pathlib.Path) -> int:
    import onnx

    model = onnx.load(str(artifact / "policy.onnx"))
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def _ms(w: LatencyWindow) -> dict:
    return {"p50": round(w.quantile(0.5) * 1e3, 4), "p99": round(w.quantile(0.99) * 1e3, 4),
            "samples": len(w)}


def measure(artifact: pathlib.Path, policy_name: str, n: int, candidates=CANDIDATES) -> list[dict]:
    """One row per candidate: p50/p99 latency of backend.infer on one fixed observation."""
    rows = []
    count = params(artifact)
    policy = PolicyRunner(artifact)
    feeds = policy.feeds(policy.synthetic_observation())
    for name, options in candidates:
        row = {"policy": policy_name, "name": name, "options": options, "params": count}
        try:
            backend = load_backend(name, artifact, policy.manifest, **options)
        except Exception as e:  # not available on this machine: say why, measure the rest
            rows.append({**row, "skipped": f"{type(e).__name__}: {e}"})
            continue
        for _ in range(20):
            backend.infer(feeds)
        w = LatencyWindow(n)
        for _ in range(n):
            t0 = time.perf_counter()
            backend.infer(feeds)
            w.add(time.perf_counter() - t0)
        info = backend.info()
        rows.append({**row, "device": info.get("device"), "providers": info.get("providers"),
                     "latency_ms": _ms(w)})
        print(f"bench backends: {policy_name} {name} {options} -> {rows[-1]['latency_ms']}",
              flush=True)
        del backend
    return rows


def refit_vs_rebuild(artifact: pathlib.Path) -> dict:
    """TensorRT: refit of a refittable engine against a full rebuild, on the same ONNX."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return {"skipped": f"TensorRT is not installed here ({e}); pip install 'tether[tensorrt]' "
                           f"on a GPU machine"}
    from runtime.artifact import load_manifest

    manifest = load_manifest(artifact)
    with tempfile.TemporaryDirectory() as cache:
        backend = load_backend("tensorrt", artifact, manifest, precision="fp16", refittable=True,
                               cache_dir=cache)
        t0 = time.perf_counter()
        refitted = backend.refit(artifact, manifest)
        t_refit = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_backend("tensorrt", artifact, manifest, precision="fp16", refittable=True,
                     cache_dir=cache)
        t_build = time.perf_counter() - t0
    return {"refit_s": round(t_refit, 3), "rebuild_s": round(t_build, 3), "refitted": refitted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_backends", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, default=300, help="timed calls per backend")
    p.add_argument("--no-large", action="store_true", help="skip the >= 100M parameter policy")
    a = p.parse_args(argv)
    result = {"host": platform.node(), "machine": platform.processor() or platform.machine(),
              "command": "python -m sim.bench_backends " + " ".join(argv or sys.argv[1:])}
    try:
        import torch

        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        result["torch"] = torch.__version__
    except ImportError:
        result["gpu"] = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("reference",) if a.no_large else ("reference", "large"):
            artifact = make_artifact(pathlib.Path(tmp), name)
            rows += measure(artifact, name, a.n)
            if name == "large":
                result["tensorrt_refit"] = refit_vs_rebuild(artifact)
    result["backends"] = rows
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
