"""The mechanics of data-parallel training (see learner/distributed.py): one Group per
process for every collective, rank 0's DistributedTrainer and the other ranks' Worker."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib
import time

import numpy as np
import torch
import torch.distributed as dist

from learner.distributed_state import (DistributedError, RegistryMirror, config_from_json,
                                       config_to_json, decode_records, empty_tensors,
                                       encode_records, load_optimizer, optimizer_layout,
                                       shard_bounds)
from learner.episodes import usable_episodes
from learner.trainer import Trainer, TrainerConfig

log = logging.getLogger("tether.learner.distributed")

# rank 0's commands to the others (the first element of every header)
HELLO, VERSION, BUILD, TRAIN, HEARTBEAT, STOP = range(6)


@dataclasses.dataclass(frozen=True)
class DistConfig:
    rank: int = 0
    world_size: int = 1
    addr: str = ""              # rank 0's HOST:PORT for the rendezvous; "" = env:// (torchrun)
    backend: str = "auto"       # auto: nccl when there is a GPU per local rank, else gloo
    timeout_s: float = 180.0    # a collective waiting longer fails: a rank died or hangs
    heartbeat_s: float = 5.0    # rank 0 pings idle ranks this often (must be << timeout_s)
    local_rank: int = 0         # the GPU of this rank on its machine (nccl)
    local_world: int = 1        # ranks on this machine: NCCL needs a GPU for each
    spawn_local: bool = False   # rank 0 starts ranks 1..N-1 itself on this machine
    keep_versions: int = 16     # versions mirrored to the other ranks (proximal snapshots)

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"data-parallel: need 0 <= rank < world_size, got rank {self.rank} "
                             f"and world size {self.world_size}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"--dist-backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.addr and ":" not in self.addr:
            raise ValueError(f"--dist-addr must be HOST:PORT, got {self.addr!r}")
        if not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError(f"need 0 < heartbeat ({self.heartbeat_s}s) < --dist-timeout "
                             f"({self.timeout_s}s)")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return "nccl" if dist.is_nccl_available() and gpus >= self.local_world else "gloo"

    @property
    def device(self) -> torch.device:
        if self.resolved_backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


class Group:
    """This process's place among the trainer ranks, and every collective it takes part in."""

    def __init__(self, config: DistConfig):
        self.config = config
        self.rank, self.world = config.rank, config.world_size
        self.device = config.device
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._last_command = time.monotonic()

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The replica this rank keeps in step with the others."""
        self.model, self.optimizer = model, optimizer

    def join(self) -> None:
        c = self.config
        if c.resolved_backend == "nccl":
            torch.cuda.set_device(self.device)
        init = f"tcp://{c.addr}" if c.addr else "env://"
        log.info("rank %d/%d: joining via %s (%s)", self.rank, self.world, init, c.resolved_backend)
        self._call(lambda: dist.init_process_group(
            c.resolved_backend, init_method=init, rank=self.rank, world_size=self.world,
            timeout=datetime.timedelta(seconds=c.timeout_s)), "the rendezvous")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _call(self, fn, what: str):
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ValueError) as e:  # gloo/nccl errors, DistBackendError, store timeouts
            text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            peer = any(w in text.lower() for w in ("closed", "timed out", "timeout", "reset",
                                                    "broken pipe", "refused"))
            why = (f"another rank died or stopped answering (timeout {self.config.timeout_s:g}s)"
                   if peer else type(e).__name__)
            raise DistributedError(
                f"trainer rank {self.rank}/{self.world}: {what} failed: {why}: {text}. "
                f"Restart every rank (rank 0 keeps ingesting meanwhile)") from e

    # -- broadcasts from rank 0 ----------------------------------------------------------------
    def broadcast(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if t.numel() == 0:  # every rank knows the size from the header: nothing to send
            return t
        on = t.to(self.device)
        self._call(lambda: dist.broadcast(on, 0), what)
        if on is not t:
            t.copy_(on.to(t.device))
        return t

    def command(self, cmd: int = 0, version: int = 0, a: int = 0, b: int = 0) -> tuple[int, ...]:
        """Rank 0 sends a header; the others receive it (their arguments are ignored)."""
        header = torch.tensor([cmd, version, a, b], dtype=torch.int64)
        self.broadcast(header, "sending a command" if self.rank == 0 else
                       "waiting for rank 0's next command")
        self._last_command = time.monotonic()
        return tuple(int(x) for x in header)

    def send_bytes(self, data: bytes | np.ndarray | None, n: int, what: str) -> np.ndarray:
        buf = torch.from_numpy(np.frombuffer(data, np.uint8).copy()) if self.rank == 0 else \
            torch.empty(n, dtype=torch.uint8)
        return self.broadcast(buf, what).numpy()

    def heartbeat_if_due(self) -> None:
        if time.monotonic() - self._last_command >= self.config.heartbeat_s:
            self.command(HEARTBEAT)

    def stop_others(self) -> None:
        self.command(STOP)

    # -- state -------------------------------------------------------------------------------
    def broadcast_state(self) -> None:
        """Make every rank's parameters and optimizer state rank 0's."""
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            self.broadcast(t.data, "broadcasting the parameters")
        layout, tensors = optimizer_layout(self.optimizer) if self.rank == 0 else (b"", [])
        n = self.command(a=len(layout))[2]
        layout = self.send_bytes(layout, n, "broadcasting the optimizer layout").tobytes()
        if self.rank != 0:
            tensors = empty_tensors(layout)
        for t in tensors:
            self.broadcast(t, "broadcasting the optimizer state")
        if self.rank != 0:
            load_optimizer(self.optimizer, layout, tensors)
        self.check_replicas(self.model)

    def check_replicas(self, model: torch.nn.Module) -> None:
        """Every rank's parameters must be bit-identical; a cheap fingerprint proves it."""
        with torch.no_grad():
            fp = torch.zeros(2, dtype=torch.float64)
            for i, p in enumerate(model.parameters()):
                fp[0] += p.double().sum()
                fp[1] += (i + 1) * p.double().abs().sum()
        both = torch.cat([fp, -fp]).to(self.device)
        self._call(lambda: dist.all_reduce(both, dist.ReduceOp.MAX), "comparing the replicas")
        both = both.cpu()
        if not torch.equal(both[:2], -both[2:]):
            raise DistributedError(f"trainer rank {self.rank}: the replicas diverged (parameter "
                                   f"fingerprints {both[:2].tolist()} vs {(-both[2:]).tolist()}); "
                                   f"restart all ranks (they start again from rank 0's weights)")

    # -- gradients ---------------------------------------------------------------------------
    def _control(self, stepping: bool, params: list, groups: list) -> torch.Tensor:
        """[stepping, lr of each param group, has-grad of each param], summed over the ranks."""
        c = torch.tensor([float(stepping)] + [float(g["lr"]) if stepping else 0.0 for g in groups]
                         + [float(stepping and p.grad is not None) for p in params],
                         dtype=torch.float64, device=self.device)
        self._call(lambda: dist.all_reduce(c), "the step handshake")
        return c.cpu()

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Trainer.after_backward: average the gradients (and the step size) over the ranks.

        Each rank computes its own ESS-scaled learning rate from its share; averaging it with the
        gradients keeps the steps identical, which keeps the replicas identical."""
        params = list(model.parameters())
        groups = self.optimizer.param_groups
        c = self._control(True, params, groups)
        if int(c[0]) != self.world:
            raise DistributedError(
                f"trainer rank {self.rank}: only {int(c[0])} of {self.world} ranks took this "
                f"minibatch step; the others had finished the update. The ranks' shares trained "
                f"different numbers of steps (records dropped inside the trainer?)")
        for g, lr in zip(groups, c[1:1 + len(groups)] / self.world):
            g["lr"] = float(lr)
        has = c[1 + len(groups):]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self._call(lambda: dist.all_reduce(flat), "averaging the gradients")
        flat = (flat / self.world).to(params[0].device)
        offset = 0
        for p, n_has in zip(params, has):
            n = p.numel()
            # a parameter no rank touched keeps grad None, so the optimizer skips it as it would
            p.grad = flat[offset:offset + n].view_as(p).clone() if n_has else None
            offset += n

    def finish_update(self) -> None:
        """The end of one update: every rank must have taken the same number of steps."""
        c = self._control(False, list(self.model.parameters()), self.optimizer.param_groups)
        if int(c[0]) != 0:
            raise DistributedError(
                f"trainer rank {self.rank}: finished its update while {int(c[0])} rank(s) still "
                f"take steps; the ranks' shares trained different numbers of steps")
        self.check_replicas(self.model)


def _usable(trainer: Trainer, records: list) -> list:
    """Rank 0 drops what the trainer would drop -- whole episodes with an unusable or too stale
    record (learner.episodes.usable_episodes) -- before sharing out, so that no rank's share
    shrinks inside train_on and every rank runs the same number of steps. Records come back
    grouped by episode, each sorted by seq."""
    episodes, _ = usable_episodes(records, trainer.spec, trainer.version, trainer.config.staleness)
    return [r for episode in episodes for r in episode]


class DistributedTrainer(Trainer):
    """Rank 0's trainer: the usual loop, with each update shared out to the other ranks."""

    def __init__(self, *args, dist_config: DistConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = Group(dist_config)
        self.group.attach(self.model, self.optimizer)
        self.after_backward = self.group.average_gradients
        self._joined = False
        self._mirrored = 0

    def join(self) -> None:
        """Rendezvous and bring every rank to this trainer's state (runs in the trainer thread,
        so ingest does not wait for the other ranks)."""
        g = self.group
        g.join()
        config = config_to_json(self.config)
        g.command(HELLO, self.version, len(config))
        g.send_bytes(config, len(config), "sending the trainer config")
        self._mirror(max(1, self.version - g.config.keep_versions + 1))
        g.command(BUILD, self.version)
        g.broadcast_state()
        self._joined = True
        log.info("rank 0: %d trainer ranks in step at version %d", g.world, self.version)

    def sync_versions(self) -> None:
        """Send the versions published since the last call to the other ranks: their trainers
        need those snapshots (proximal policies) exactly as this one has them."""
        if self.version > self._mirrored:
            self._mirror(self._mirrored + 1)

    def _mirror(self, first: int) -> None:
        for v in range(first, self.version + 1):
            try:
                manifest = (self.registry.artifact_dir(v) / "manifest.json").read_bytes()
            except KeyError:
                continue
            path = self.registry.checkpoint_path(v)
            checkpoint = path.read_bytes() if path.exists() else b""
            self.group.command(VERSION, v, len(manifest), len(checkpoint))
            self.group.send_bytes(manifest, len(manifest), f"mirroring version {v}")
            self.group.send_bytes(checkpoint, len(checkpoint), f"mirroring version {v}")
        self._mirrored = self.version

    def step(self, *args, **kwargs) -> bool:
        if not self._joined:
            self.join()
        did = super().step(*args, **kwargs)
        self.sync_versions()
        self.group.heartbeat_if_due()
        return did

    def train_on(self, records, *args, **kwargs) -> dict:
        if not self._joined:
            self.join()
        ordered = _usable(self, records)
        lengths, payload = encode_records(ordered)
        g = self.group
        g.command(TRAIN, self.version, len(ordered), len(payload))
        g.broadcast(torch.from_numpy(lengths), "sending record lengths")
        g.send_bytes(payload, len(payload), "sending records")
        lo, hi = shard_bounds(len(ordered), 0, g.world)
        metrics = _train_in_step(g, lambda share: super(DistributedTrainer, self).train_on(
            share, *args, **kwargs), ordered[lo:hi])
        # the trainer's own "dropped" counts only see rank 0's share: these are for all ranks
        metrics.update(world_size=g.world, records_all_ranks=(hi - lo) * g.world,
                       records_left_over=len(ordered) - (hi - lo) * g.world,
                       records_dropped_before_sharing=len(records) - len(ordered))
        return metrics

    def _reverted(self) -> None:
        if self._joined:  # the other ranks rebuild and take rank 0's reverted state
            self.group.command(BUILD, self.version)
            self.group.broadcast_state()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        if self._joined and self.error is None and not (self._thread and self._thread.is_alive()):
            try:
                self.group.stop_others()
            except DistributedError as e:
                log.warning("could not tell the other ranks to stop: %s", e)
        self.group.close()


def _train_in_step(group: Group, train, records) -> dict:
    """One update on this rank's share, closed by the end-of-update handshake (which also
    catches ranks that ran a different number of steps, instead of hanging)."""
    try:
        metrics = train(records)
    except DistributedError:
        raise
    except BaseException:
        try:  # tell the others this rank is out, so that they fail cleanly instead of waiting
            group.finish_update()
        except DistributedError:
            pass
        raise
    group.finish_update()
    return metrics


class Worker:
    """A trainer rank other than 0: mirrors rank 0's versions and trains on its share."""

    def __init__(self, config: DistConfig, home: str | pathlib.Path):
        self.group = Group(config)
        self.registry = RegistryMirror(pathlib.Path(home) / "registry", config.keep_versions)
        self.trainer: Trainer | None = None
        self.trainer_config: TrainerConfig | None = None
        self.updates = 0

    def run(self) -> int:
        g = self.group
        g.join()
        try:
            while True:
                cmd, version, a, b = g.command()
                if cmd == STOP:
                    log.info("rank %d: stopped by rank 0 after %d updates", g.rank, self.updates)
                    return 0
                if cmd == HELLO:
                    data = g.send_bytes(None, a, "receiving the trainer config").tobytes()
                    self.trainer_config = config_from_json(TrainerConfig, data)
                elif cmd == VERSION:
                    manifest = g.send_bytes(None, a, f"mirroring version {version}").tobytes()
                    checkpoint = g.send_bytes(None, b, f"mirroring version {version}").tobytes()
                    self.registry.write(version, manifest, checkpoint)
                elif cmd == BUILD:
                    self.build(version)
                elif cmd == TRAIN:
                    self.train(version, a, b)
                elif cmd != HEARTBEAT:
                    raise DistributedError(f"rank {g.rank}: unknown command {cmd} from rank 0")
        finally:
            g.close()

    def build(self, version: int) -> None:
        self.registry.version = version
        torch.set_num_threads(1)  # like rank 0's trainer thread
        self.trainer = Trainer(None, self.registry, self.trainer_config)  # no store: never polls
        self.group.attach(self.trainer.model, self.trainer.optimizer)
        self.trainer.after_backward = self.group.average_gradients
        self.group.broadcast_state()

    def train(self, version: int, n: int, size: int) -> None:
        g = self.group
        lengths = g.broadcast(torch.empty(n, dtype=torch.int64), "receiving record lengths").numpy()
        payload = g.send_bytes(None, size, "receiving records")
        lo, hi = shard_bounds(n, g.rank, g.world)
        self.registry.version = self.trainer.version = version
        metrics = _train_in_step(g, self.trainer.train_on, decode_records(lengths, payload, lo, hi))
        self.updates += 1
        log.info("rank %d: update %d at version %d: %d records, %s steps", g.rank, self.updates,
                 version, hi - lo, metrics.get("steps", 0))
