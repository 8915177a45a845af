"""``tether learner``: the store, the registry, the gRPC service and the trainer in one process.

Prints ``learner listening on HOST:PORT`` once ready and keeps ``DATA/learner.json`` (address,
stats, rollout state) fresh every 2 s. SIGTERM/SIGINT: stop accepting, stop the trainer, close
the store, exit 0.

Every version is signed with the learner's ed25519 key (``--signing-key``, default
``DATA/signing_key.pem``, created with ``DATA/signing_key.pub`` on first start: give robots the
``.pub``). New versions go to a canary fraction of the robots first (learner/canary.py).

Robots and operators connect over mutual TLS (``--tls-cert --tls-key --tls-ca``, made with
``tether certs``; who may call what: learner/auth.py); plaintext only with ``--insecure``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time

from learner import distributed
from learner.auth import add_tls_arguments, tls_from_args
from learner.canary import CanaryConfig, RolloutController
from learner.ingest_pool import ValidatorPool, ValidatorUnavailable, default_workers
from learner.registry import Registry
from learner.signing import PRIVATE_NAME, SigningKey, load_or_create
from learner.service import serve
from learner.store import ExperienceStore
from learner.trainer import Trainer, TrainerConfig
from runtime.artifact import write_atomic

log = logging.getLogger("tether.learner")
STATUS_EVERY_S = 2.0
# versions the registry keeps by default: ~5.6 MB each for the reference policy (artifact,
# checkpoint with Adam's state), so ~360 MB, where every version of a 15-minute fleet at S = 4
# that publishes every update was 617 MB and growing
KEEP_VERSIONS = 64


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tether learner", description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any)")
    p.add_argument("--data", required=True, help="directory for the store, registry and status")
    p.add_argument("--init-artifact", help="pretrained policy artifact, imported as version 1 "
                                            "when the registry is empty")
    p.add_argument("--init-checkpoint", help="torch state_dict of the pretrained model (default: "
                                              "model.pt inside or next to --init-artifact)")
    p.add_argument("--demos", help="demonstrations (.npz from `tether pretrain`) the trainer "
                   "keeps imitating next to the fleet's data (default: demos.npz inside or next "
                   "to --init-artifact, when there)")
    p.add_argument("--publish-interval", type=float, default=25.0, help="seconds between publishes")
    p.add_argument("--trainer", default="{}", help="TrainerConfig overrides as a JSON object of "
                   "its plain fields, e.g. '{\"imitation_steps\": 0, \"lr\": 1e-5}' "
                   "(learner/trainer_config.py)")
    p.add_argument("--min-episodes", type=int, default=2, help="new complete episodes per publish")
    p.add_argument("--staleness", type=int, default=TrainerConfig.staleness,
                   help="versions of staleness allowed: 0 = synchronous on-policy (robots wait "
                        "for each new version), larger = more asynchronous")
    p.add_argument("--keep-versions", type=int, default=KEEP_VERSIONS,
                   help="newest versions whose artifacts and checkpoints the registry keeps "
                        "(also version 1 and the rollout's stable and canary); 0 keeps all")
    p.add_argument("--signing-key", help="ed25519 private key (PEM) that signs every version "
                   "(default: DATA/signing_key.pem, created on first start with its .pub)")
    p.add_argument("--canary-fraction", type=float, default=CanaryConfig.fraction,
                   help="fraction of robots that try a new version first (0: everyone at once)")
    p.add_argument("--canary-episodes", type=int, default=CanaryConfig.episodes,
                   help="canary episodes on a new version before it is promoted or rolled back")
    p.add_argument("--verifier-every", type=int, default=TrainerConfig.verifier.every,
                   help="retrain the verifier's chunk scorer and ship it with every N-th published "
                        "version (0: never; robots then run the envelope and shape checks only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ingest-workers", type=int, default=default_workers(),
                   help="processes that validate incoming experience (default: one per two "
                        "cores, 2..4); 0 validates in the learner's own threads")
    p.add_argument("--no-train", action="store_true", help="ingest and serve only")
    p.add_argument("--log-level", default="INFO")
    distributed.add_arguments(p)
    add_tls_arguments(p)
    return p.parse_args(argv)


def find_checkpoint(artifact: pathlib.Path, given: str | None) -> pathlib.Path | None:
    if given:
        path = pathlib.Path(given)
        if not path.is_file():
            raise SystemExit(f"tether learner: --init-checkpoint {path} does not exist")
        return path
    return _beside(artifact, "model.pt")


def _beside(artifact: pathlib.Path, name: str) -> pathlib.Path | None:
    """``name`` inside the artifact folder or next to it (where `tether pretrain` writes it)."""
    for candidate in (artifact / name, artifact.parent / name):
        if candidate.is_file():
            return candidate
    return None


def trainer_overrides(config: TrainerConfig, text: str) -> TrainerConfig:
    """``config`` with the plain fields of the JSON object ``text`` replaced (a list of names
    for a tuple field); ValueError names what is wrong (not JSON, not an object, an unknown or
    a nested field)."""
    try:
        overrides = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--trainer is not JSON ({e}): {text!r}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--trainer must be a JSON object, got {text!r}")
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"--trainer: TrainerConfig has no field {name!r} "
                             f"(fields: {sorted(fields)})")
        names = isinstance(getattr(config, name), tuple) and isinstance(value, list) \
            and all(isinstance(v, str) for v in value)  # e.g. "frozen": ["encoders"]
        if dataclasses.is_dataclass(getattr(config, name)) or (
                isinstance(value, (dict, list)) and not names):
            raise ValueError(f"--trainer: {name!r} is not a plain field")
    return dataclasses.replace(config, **overrides)  # __post_init__ checks the values


def find_demos(artifact: str | None, given: str | None) -> str:
    if given:
        if not pathlib.Path(given).is_file():
            raise SystemExit(f"tether learner: --demos {given} does not exist")
        return given
    found = _beside(pathlib.Path(artifact), "demos.npz") if artifact else None
    return str(found) if found else ""


def status(addr: str, store: ExperienceStore, registry: Registry, trainer,
           rollout: RolloutController | None = None) -> dict:
    return {"rollout": rollout.status() if rollout is not None else None,
            "addr": addr, "latest_version": registry.latest(), "records": store.count(),
            "duplicates_dropped": store.duplicates_dropped,
            "versions_published": trainer.versions_published if trainer else registry.published,
            "versions_on_disk": len(registry.versions()), "versions_removed": registry.pruned,
            "train_steps": trainer.train_steps if trainer else 0,
            "trainer_error": repr(trainer.error) if trainer and trainer.error else None,
            "last_update": trainer.last_metrics if trainer else {},
            "ingest_validators": store.validators.status() if store.validators else None,
            "robots": store.stats(), "time": time.time()}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data = pathlib.Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    try:
        dist_config = distributed.from_args(args)
    except ValueError as e:
        print(f"tether learner: {e}", file=sys.stderr)
        return 2
    if dist_config.rank > 0:  # an extra trainer rank: no store, no service, no publishing
        distributed.exit_rank(distributed.worker_main(dist_config, data))
    try:
        tls = tls_from_args(args)  # mutual TLS unless --insecure (learner/auth.py)
    except ValueError as e:
        print(f"tether learner: {e}", file=sys.stderr)
        return 2
    if args.keep_versions < 0:
        print(f"tether learner: --keep-versions must be >= 0 (0 keeps every version), got "
              f"{args.keep_versions}", file=sys.stderr)
        return 2
    if args.ingest_workers < 0:
        print(f"tether learner: --ingest-workers must be >= 0, got {args.ingest_workers}",
              file=sys.stderr)
        return 2
    try:
        validators = ValidatorPool(args.ingest_workers) if args.ingest_workers else None
    except ValidatorUnavailable as e:
        print(f"tether learner: {e}", file=sys.stderr)
        return 2
    try:
        store = ExperienceStore(data / "experience", readonly=False, validators=validators)
    except BaseException:
        if validators is not None:
            validators.close()
        raise
    try:
        canary = CanaryConfig(fraction=args.canary_fraction, episodes=args.canary_episodes)
        key_path = pathlib.Path(args.signing_key) if args.signing_key else data / PRIVATE_NAME
        if args.signing_key:
            key, created = SigningKey.load(key_path), False
        else:
            key, created = load_or_create(key_path)
    except ValueError as e:
        print(f"tether learner: {e}", file=sys.stderr)
        return 2
    log.info("signing versions with key %s from %s%s", key.key_id, key_path,
             f" (new; robots need its public key {key_path.with_suffix('.pub')})" if created else "")
    registry = Registry(data / "registry", signing_key=key, keep_versions=args.keep_versions)
    if registry.latest() == 0:
        if not args.init_artifact:
            print("tether learner: the registry is empty; pass --init-artifact DIR "
                  "(run `tether pretrain` to make one)", file=sys.stderr)
            return 2
        artifact = pathlib.Path(args.init_artifact)
        registry.import_initial(artifact, find_checkpoint(artifact, args.init_checkpoint))
    trainer, ranks = None, []
    if not args.no_train:
        try:
            dist_config, ranks = distributed.spawn_local(dist_config, data)
            config = trainer_overrides(TrainerConfig(
                publish_interval_s=args.publish_interval, min_new_episodes=args.min_episodes,
                seed=args.seed, staleness=args.staleness,
                demos=find_demos(args.init_artifact, args.demos),
                verifier=dataclasses.replace(TrainerConfig.verifier, every=args.verifier_every)),
                args.trainer)
            trainer = distributed.trainer_class(dist_config)(store, registry, config,
                                                             log_path=data / "updates.jsonl")
        except (RuntimeError, ValueError) as e:
            distributed.stop_local(ranks, timeout=0)
            print(f"tether learner: {e} (or run with --no-train)", file=sys.stderr)
            return 2
    rollout = RolloutController(registry, store, canary,
                                on_rollback=trainer.revert_to if trainer else None).start()
    server, port = serve(args.addr, store, registry, trainer, rollout=rollout, tls=tls)
    addr = f"{args.addr.rsplit(':', 1)[0]}:{port}"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if trainer is not None:
        trainer.start()
    print(f"learner listening on {addr}", flush=True)
    try:
        while not stop.is_set():
            write_atomic(data / "learner.json",
                         json.dumps(status(addr, store, registry, trainer, rollout),
                                    indent=1).encode())
            stop.wait(STATUS_EVERY_S)
    finally:
        registry.close()  # ends subscriber streams
        server.stop(grace=2.0).wait()
        if trainer is not None:
            trainer.stop()
        distributed.stop_local(ranks)
        rollout.stop()
        write_atomic(data / "learner.json",
                     json.dumps(status(addr, store, registry, trainer, rollout),
                                indent=1).encode())
        store.close()
    log.info("learner stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
