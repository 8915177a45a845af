"""``tether learner``: the store, the registry, the gRPC service and the trainer in one process.

Prints ``learner listening on HOST:PORT`` once ready and keeps ``DATA/learner.json`` (address
and stats) fresh every 2 s. SIGTERM/SIGINT: stop accepting, stop the trainer, close the store,
exit 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import signal
import sys
import threading
import time

from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
from learner.trainer import Trainer, TrainerConfig
from runtime.artifact import write_atomic

log = logging.getLogger("tether.learner")
STATUS_EVERY_S = 2.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tether learner", description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any)")
    p.add_argument("--data", required=True, help="directory for the store, registry and status")
    p.add_argument("--init-artifact", help="pretrained policy artifact, imported as version 1 "
                                            "when the registry is empty")
    p.add_argument("--init-checkpoint", help="torch state_dict of the pretrained model (default: "
                                              "model.pt inside or next to --init-artifact)")
    p.add_argument("--publish-interval", type=float, default=25.0, help="seconds between publishes")
    p.add_argument("--min-episodes", type=int, default=2, help="new complete episodes per publish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="ingest and serve only")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def find_checkpoint(artifact: pathlib.Path, given: str | None) -> pathlib.Path | None:
    if given:
        path = pathlib.Path(given)
        if not path.is_file():
            raise SystemExit(f"tether learner: --init-checkpoint {path} does not exist")
        return path
    for candidate in (artifact / "model.pt", artifact.parent / "model.pt"):
        if candidate.is_file():
            return candidate
    return None


def status(addr: str, store: ExperienceStore, registry: Registry, trainer) -> dict:
    return {"addr": addr, "latest_version": registry.latest(), "records": store.count(),
            "duplicates_dropped": store.duplicates_dropped,
            "versions_published": trainer.versions_published if trainer else registry.published,
            "train_steps": trainer.train_steps if trainer else 0,
            "trainer_error": repr(trainer.error) if trainer and trainer.error else None,
            "last_update": trainer.last_metrics if trainer else {},
            "robots": store.stats(), "time": time.time()}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data = pathlib.Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    store = ExperienceStore(data / "experience.sqlite")
    registry = Registry(data / "registry")
    if registry.latest() == 0:
        if not args.init_artifact:
            print("tether learner: the registry is empty; pass --init-artifact DIR "
                  "(run `tether pretrain` to make one)", file=sys.stderr)
            return 2
        artifact = pathlib.Path(args.init_artifact)
        registry.import_initial(artifact, find_checkpoint(artifact, args.init_checkpoint))
    trainer = None
    if not args.no_train:
        try:
            trainer = Trainer(store, registry, TrainerConfig(
                publish_interval_s=args.publish_interval, min_new_episodes=args.min_episodes,
                seed=args.seed))
        except (RuntimeError, ValueError) as e:
            print(f"tether learner: {e} (or run with --no-train)", file=sys.stderr)
            return 2
    server, port = serve(args.addr, store, registry, trainer)
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
                         json.dumps(status(addr, store, registry, trainer), indent=1).encode())
            stop.wait(STATUS_EVERY_S)
    finally:
        registry.close()  # ends subscriber streams
        server.stop(grace=2.0).wait()
        if trainer is not None:
            trainer.stop()
        write_atomic(data / "learner.json",
                     json.dumps(status(addr, store, registry, trainer), indent=1).encode())
        store.close()
    log.info("learner stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
