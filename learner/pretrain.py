"""Behaviour cloning of the reference VLA on scripted-expert demos: the fleet's version 1.

Training-time real-time chunking: each sample gets a random prefix length d in [0, H//2];
rows 0..d-1 of the input prefix are the true next actions (with small noise, as a real
executing chunk would not match the expert exactly) and the loss covers only rows >= d that are
real actions (not end-of-episode padding).

Loss: MSE on the mean plus the Gaussian NLL of the per-row ``log_std`` with the mean detached.
MSE keeps the mean's step size independent of the current spread; the NLL then fits log_std to
the residual spread, so the exported Gaussian is calibrated for the behaviour log-probs RL uses.

Normalization: state mean/std from the demos (std floored at 1e-2 so a constant component
does not explode); actions are already in [-1, 1], so action_mean 0 and action_std 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np
import torch

from learner.demos import DemoSet, collect_demos
from learner.export import config_from_manifest, export_artifact
from learner.imitation import committed_prefix
from learner.model import ReferenceVLA, VLAConfig
from robots.description import load_description
from runtime.artifact import ArtifactError, load_manifest, verify_artifact, write_atomic
from runtime.tokenizer import tokenize

CODE_VERSION = 2  # bump when a change here should invalidate cached pretrained policies
ROBOT = "sawyer_metaworld"
STATE_STD_FLOOR = 1e-2
DONE = "DONE"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    tasks: tuple[str, ...]
    seed: int = 0
    episodes_per_task: int = 30
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    horizon: int = 8
    prefix_noise: float = 0.02
    action_noise: float = 0.1
    camera: str = "fast"
    max_steps: int = 150
    eval_episodes: int = 10
    threads: int = 2
    row_correlation: float = 0.0   # of the exploration noise between a chunk's rows (VLAConfig)

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("pretrain: give at least one task (--tasks reach-v3,...)")
        if self.episodes_per_task < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"pretrain: episodes_per_task, steps and batch_size must be >= 1: "
                             f"{self}")
        if self.horizon < 2 or self.lr <= 0:
            raise ValueError(f"pretrain: need horizon >= 2 and lr > 0: {self}")

    def key(self) -> str:
        """Cache key: every setting that changes the result, plus the code version."""
        d = dataclasses.asdict(self)
        d.pop("eval_episodes"), d.pop("threads")
        d["code_version"] = CODE_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def normalization_from(demos: DemoSet) -> dict:
    a = demos.actions.shape[1]
    return {"state_mean": demos.state.mean(0).astype(np.float32),
            "state_std": np.maximum(demos.state.std(0), STATE_STD_FLOOR).astype(np.float32),
            "action_mean": np.zeros(a, np.float32), "action_std": np.ones(a, np.float32)}


def _tensors(demos: DemoSet, vla: VLAConfig, norm: dict) -> dict:
    spec = {"kind": "bytes", "max_len": vla.max_tokens}
    task_tokens = np.stack([tokenize(text, spec) for text in demos.instructions])
    targets, valid = demos.chunk_targets(vla.horizon)
    state = (demos.state - norm["state_mean"]) / norm["state_std"]
    return {"images": torch.from_numpy(np.ascontiguousarray(demos.images.transpose(0, 3, 1, 2))),
            "state": torch.from_numpy(state.astype(np.float32)),
            "tokens": torch.from_numpy(task_tokens[demos.task_index]),
            "targets": torch.from_numpy(targets), "valid": torch.from_numpy(valid)}


def train_bc(model: ReferenceVLA, demos: DemoSet, norm: dict, config: PretrainConfig,
             log=None) -> list[float]:
    """Behaviour-clone ``model`` on ``demos`` in place; returns the loss per step."""
    c = model.config
    data = _tensors(demos, c, norm)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    cam = c.cameras[0]
    losses = []
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(demos), (config.batch_size,), generator=gen)
        target, valid = data["targets"][idx], data["valid"][idx]
        prefix, d, mask = committed_prefix(target, valid, gen, config.prefix_noise)
        images = {cam: data["images"][idx].float() / 255.0}
        mean, log_std, _ = model(images, data["state"][idx], data["tokens"][idx], prefix, d)
        denom = mask.sum().clamp(min=1.0) * c.action_dim
        mse = (((mean - target) ** 2) * mask).sum() / denom
        z2 = ((mean.detach() - target) ** 2) * torch.exp(-2 * log_std)
        nll = ((0.5 * z2 + log_std) * mask).sum() / denom
        loss = mse + nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if log and (step % 250 == 0 or step == config.steps - 1):
            log(f"pretrain: step {step + 1}/{config.steps} mse {mse.item():.4f} "
                f"nll {nll.item():.3f}")
    model.eval()
    return losses


class _TorchPolicy:
    def __init__(self, model: ReferenceVLA, norm: dict):
        self.model, self.norm = model.eval(), norm
        self.config = model.config

    def __call__(self, image, state, tokens, prefix, prefix_len) -> np.ndarray:
        with torch.no_grad():
            mean, _, _ = self.model(
                {self.config.cameras[0]: torch.from_numpy(image)}, torch.from_numpy(state),
                torch.from_numpy(tokens), torch.from_numpy(prefix), torch.from_numpy(prefix_len))
        return mean.numpy()


class _OnnxPolicy:
    def __init__(self, artifact: pathlib.Path):
        import onnxruntime as ort

        manifest = verify_artifact(artifact)
        self.config = config_from_manifest(manifest)
        self.norm = {k: np.asarray(v, np.float32) for k, v in manifest.normalization.items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(artifact / "policy.onnx"), opts,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, image, state, tokens, prefix, prefix_len) -> np.ndarray:
        feeds = {f"image_{self.config.cameras[0]}": image, "state": state, "tokens": tokens,
                 "prefix": prefix, "prefix_len": prefix_len}
        return self.session.run(["mean"], feeds)[0]


def evaluate(model_or_artifact, tasks, episodes: int, seed: int, execute: int | None = None,
             norm: dict | None = None, camera: str = "fast", max_steps: int = 150) -> dict:
    """Roll the policy out synchronously (mean actions, the first ``execute`` actions of each
    chunk, default H//2) in fresh ``MetaWorldRobot``s; returns {task: success rate}.
    ``model_or_artifact``: a ``ReferenceVLA`` (then pass ``norm``) or an artifact directory."""
    from sim.metaworld_robot import MetaWorldRobot

    if isinstance(model_or_artifact, ReferenceVLA):
        if norm is None:
            raise ValueError("evaluate: a torch model needs its normalization dict (norm=)")
        policy = _TorchPolicy(model_or_artifact, norm)
    else:
        policy = _OnnxPolicy(pathlib.Path(model_or_artifact))
    c, norm = policy.config, {k: np.asarray(v, np.float32) for k, v in policy.norm.items()}
    execute = execute or c.horizon // 2
    if not 1 <= execute <= c.horizon:
        raise ValueError(f"evaluate: execute must be in [1, {c.horizon}], got {execute}")
    prefix = np.zeros((1, c.horizon, c.action_dim), np.float32)
    prefix_len = np.zeros(1, np.int64)
    rates = {}
    for ti, task in enumerate(tasks):
        # a seed stream disjoint from collect_demos' so evaluation sees unseen variations
        robot = MetaWorldRobot(task, seed=10_000 + seed * 7919 + ti, camera=camera,
                               max_steps=max_steps)
        wins = 0
        try:
            for _ in range(episodes):
                obs = robot.reset()
                tokens = tokenize(obs.instruction, {"kind": "bytes", "max_len": c.max_tokens})[None]
                done = success = False
                while not done:
                    image = (obs.images[c.cameras[0]].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
                    state = ((obs.state - norm["state_mean"]) / norm["state_std"])[None].astype(np.float32)
                    chunk = policy(image, state, tokens, prefix, prefix_len)[0]
                    for a_n in chunk[:execute]:
                        res = robot.send_action(a_n * norm["action_std"] + norm["action_mean"])
                        success = success or res.success
                        done = res.terminated or res.truncated
                        if done:
                            break
                    obs = robot.observe()
                wins += success
        finally:
            robot.close()
        rates[task] = wins / episodes
    return rates


def pretrain(tasks, cache_dir, seed: int = 0, log=print, **settings) -> pathlib.Path:
    """Collect demos, behaviour-clone, export. Writes ``<cache_dir>/artifact/`` (the policy
    artifact, version 1), ``<cache_dir>/model.pt`` (torch state_dict, for the learner to resume
    from), ``<cache_dir>/demos.npz`` and ``<cache_dir>/pretrain.json`` (settings, timings,
    success rates). Returns the artifact directory."""
    config = PretrainConfig(tasks=tuple(tasks), seed=seed, **settings)
    out = pathlib.Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(config.threads)
    t0 = time.monotonic()
    demos = collect_demos(config.tasks, config.episodes_per_task, seed, camera=config.camera,
                          max_steps=config.max_steps, action_noise=config.action_noise)
    demos.save(out / "demos.npz")
    t_demos = time.monotonic() - t0
    log(f"pretrain: {len(demos)} demo ticks in {t_demos:.1f}s, expert success "
        f"{demos.success_rate()}")
    desc = load_description(ROBOT)
    cam = desc.cameras[0]
    vla = VLAConfig(horizon=config.horizon, action_dim=desc.action_dim,
                    state_dim=desc.state_dim, cameras=(cam.name,), image_hw=(cam.height, cam.width),
                    channels=cam.channels, row_correlation=config.row_correlation)
    model = ReferenceVLA(vla)
    norm = normalization_from(demos)
    losses = train_bc(model, demos, norm, config, log=log)
    t_train = time.monotonic() - t0 - t_demos
    torch.save(model.state_dict(), out / "model.pt")
    artifact = out / "artifact"
    export_artifact(model, artifact, version=1, parent_version=0, normalization=norm,
                    robot=ROBOT, control_rate_hz=desc.control_rate_hz)
    rates = (evaluate(model, config.tasks, config.eval_episodes, seed, norm=norm,
                      camera=config.camera, max_steps=config.max_steps)
             if config.eval_episodes > 0 else {})
    report = {"config": dataclasses.asdict(config), "code_version": CODE_VERSION,
              "demo_ticks": len(demos), "expert_success": demos.success_rate(),
              "demo_seconds": round(t_demos, 2), "train_seconds": round(t_train, 2),
              "final_mse": float(np.mean(losses[-50:])), "bc_success": rates}
    write_atomic(out / "pretrain.json", json.dumps(report, indent=2).encode())
    log(f"pretrain: trained in {t_train:.1f}s; BC success {rates}")
    return artifact


def ensure_pretrained(tasks, cache_dir, seed: int = 0, log=print, **settings) -> pathlib.Path:
    """The cached artifact for these settings, pretraining first if it is missing or broken.
    Cached under ``cache_dir/<hash of settings and CODE_VERSION>/``; ``DONE`` is written last."""
    config = PretrainConfig(tasks=tuple(tasks), seed=seed, **settings)
    entry = pathlib.Path(cache_dir) / config.key()
    artifact = entry / "artifact"
    if (entry / DONE).exists():
        try:
            verify_artifact(artifact)
            return artifact
        except ArtifactError as e:
            log(f"pretrain: cached artifact is broken ({e}); pretraining again")
    if entry.exists():
        shutil.rmtree(entry)
    pretrain(config.tasks, entry, seed=seed, log=log, **settings)
    write_atomic(entry / DONE, config.key().encode())
    return artifact


def load_pretrained_model(cache_entry) -> ReferenceVLA:
    """The torch model saved next to a pretrained artifact (``<entry>/model.pt``)."""
    entry = pathlib.Path(cache_entry)
    model = ReferenceVLA(config_from_manifest(load_manifest(entry / "artifact")))
    model.load_state_dict(torch.load(entry / "model.pt", weights_only=True))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tether pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="", help="comma-separated Meta-World tasks "
                   "(default: sim.tasks.DEFAULT_TASKS)")
    p.add_argument("--cache-dir", "--out", dest="cache_dir", default=".tether-cache/pretrained")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes-per-task", type=int, default=PretrainConfig.episodes_per_task)
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--max-steps", type=int, default=PretrainConfig.max_steps,
                   help="episode length limit for demos and evaluation")
    p.add_argument("--eval-episodes", type=int, default=PretrainConfig.eval_episodes)
    p.add_argument("--camera", default=PretrainConfig.camera, help="fast | mujoco")
    a = p.parse_args(argv)
    from sim.tasks import DEFAULT_TASKS, get_task

    tasks = tuple(t for t in a.tasks.split(",") if t) or DEFAULT_TASKS
    try:
        for t in tasks:
            get_task(t)
        artifact = ensure_pretrained(tasks, a.cache_dir, seed=a.seed,
                                     episodes_per_task=a.episodes_per_task, steps=a.steps,
                                     batch_size=a.batch_size, max_steps=a.max_steps,
                                     eval_episodes=a.eval_episodes, camera=a.camera)
    except ValueError as e:
        print(f"tether pretrain: {e}", file=sys.stderr)
        return 2
    report = json.loads((artifact.parent / "pretrain.json").read_text())
    print(f"artifact: {artifact}")
    print(f"BC success: {report['bc_success']} (expert {report['expert_success']})")
    return 0
