"""The robot side must run without torch and without the learner (DESIGN.md, Folders)."""
import json
import subprocess
import sys

REPO_PACKAGES = ("robots", "runtime", "verifier")
OPTIONAL = ("rclpy", "tensorrt", "pycuda", "cuda")
TORCH_BACKENDS = ("runtime.backends.torch_backend", "runtime.backends.onnx_torch",
                  "runtime.backends.trt_backend")

PROBE = """
import importlib, json, pkgutil, sys
names = []
for pkg in {packages!r}:
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name in {by_name!r}:
            continue  # backends that need torch, loaded by name only when chosen
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            # optional hardware stacks (ROS 2, TensorRT) may be absent here; anything else fails
            if (e.name or "").split(".")[0] not in {optional!r}:
                raise
            continue
        names.append(info.name)
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torch", "learner", "tensorrt", "sim"))
print(json.dumps({{"imported": names, "heavy": heavy}}))
"""


def test_robot_side_imports_neither_torch_nor_learner():
    r = subprocess.run([sys.executable, "-c", PROBE.format(packages=REPO_PACKAGES, optional=OPTIONAL,
                                                          by_name=TORCH_BACKENDS)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # the probe really imported the modules it is about
    for name in ("runtime.node", "runtime.policy", "runtime.control", "runtime.inference",
                 "runtime.backends.ort_backend", "verifier.envelope", "verifier.gate"):
        assert name in result["imported"]
    assert result["heavy"] == [], result["heavy"]
