"""Fetching a new version in a process of its own: the control loop's CPU and GIL stay its own.

In a thread of the robot's process, a fetch shares the control thread's GIL (a fetch thread
preempted while holding it stalls the control loop however nice it is), and gRPC's receive
threads and the kernel's page-cache copies of the fetched bytes run at the control loop's
priority. On a busy computer those are the ticks a swap misses (README, Weight rollout). Here
the same ``ArtifactFetcher`` (runtime/fetch.py) runs in a long-lived child,
``python -m runtime.fetch_process``, whose every thread runs ``nice`` steps nicer than the robot
(or under SCHED_IDLE), so a control thread that wakes up takes a core from it at once.

The parent (``FetchProcess``, used by runtime/weights.py in place of an in-process fetcher) and
the child speak JSON lines over the child's stdin and stdout (no pickle; the announcement as
base64 protobuf). Parent -> child: ``{"fetch": ann}``, ``{"abandon": version}``. Child ->
parent: ``{"event", "level"}`` (progress), then ``{"version", ...}`` with one of ``done`` (the
staged folder, and ``resumed_bytes``), ``refused`` (why) or ``abandoned``. The parent keeps
deciding what is superseded: it polls ``superseded(version)`` while it waits and sends
``abandon``. The child checks the signature before fetching the big files and each file's
sha256 as it writes it; the parent checks the staged manifest's signature and its agreement with
the announcement again (``check_manifest``: a few hundred bytes) before handing the folder on.

A child that dies (killed, out of memory) is started again and the fetch goes on from the
bytes already on disk; one that dies ``MAX_DEATHS`` times in a row on a version refuses it.
The child exits when its stdin closes, so it never outlives the robot.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import pathlib
import select
import subprocess
import sys
import threading
import time
from typing import Callable

import grpc

from runtime.artifact import Manifest
from runtime.fetch import Abandoned, Refused, check_manifest
from runtime.signature import Trust
from tether.wire import tether_pb2 as pb

log = logging.getLogger(__name__)

MAX_DEATHS = 3          # child deaths in a row during one version's fetch before it is refused
POLL_S = 0.05           # how often the waiting parent asks superseded(version)
IDLE = "idle"           # ``priority``: SCHED_IDLE (Linux), run only on otherwise idle cores
# the child's channel never goes idle (gRPC's default drops the connection after 30 min
# without calls): the next version's fetch finds it connected
KEEP_CONNECTED = (("grpc.client_idle_timeout_ms", 2**31 - 1),)


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    """How a process opens its channel to the learner: plaintext, TLS checking the learner's
    certificate against ``tls_ca``, or mutual TLS with the robot's certificate and key as well
    (runtime/tls.py): a callable channel factory cannot cross a process, file names can."""
    addr: str
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = ""

    def channel_factory(self, extra_options: tuple = ()) -> Callable[[str], grpc.Channel]:
        """Reads the files now: a missing or unreadable one fails here. ``extra_options``:
        gRPC channel arguments on top of the common ones."""
        if self.tls_cert or self.tls_key:
            from runtime.tls import TlsConfig
            return TlsConfig(self.tls_cert, self.tls_key, self.tls_ca,
                             self.tls_server_name or None).channel_factory(extra_options)
        from runtime.stream import CHANNEL_OPTIONS
        options = list(CHANNEL_OPTIONS) + list(extra_options)
        if not self.tls_ca:
            return lambda addr: grpc.insecure_channel(addr, options=options)
        from runtime.tls import read_pem
        creds = grpc.ssl_channel_credentials(read_pem(self.tls_ca, "learner_ca"))
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return lambda addr: grpc.secure_channel(addr, creds, options=options)


def fetch_setting_error(fetch: str, priority: str) -> str | None:
    """Why a robot's fetch settings (``fetch``: process | thread, ``priority``: idle | a nice
    increment 1..19, as text) are invalid; None when they are valid."""
    if fetch not in ("process", "thread"):
        return f"fetch must be 'process' or 'thread', got {fetch!r}"
    if priority != IDLE and not (priority.isdigit() and 1 <= int(priority) <= 19):
        return f"fetch_priority must be 'idle' or a nice increment 1..19, got {priority!r}"
    return None


def _trust_json(trust: Trust) -> dict:
    return {"keys": [[kid, raw.hex()] for kid, raw in trust.keys],
            "allow_unsigned": trust.allow_unsigned}


def _trust_from(d: dict) -> Trust:
    return Trust(tuple((kid, bytes.fromhex(raw)) for kid, raw in d["keys"]),
                 bool(d["allow_unsigned"]))


def lower_process_priority(priority: int | str) -> str:
    """Make this process (and every thread it starts from now on) background work; returns
    what it got. ``priority``: a nice increment, or ``IDLE`` for SCHED_IDLE."""
    if priority == IDLE and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            priority = 19
    if priority == IDLE:
        priority = 19
    try:
        return f"nice {os.nice(int(priority))}"
    except OSError as e:
        return f"priority unchanged ({e})"


class FetchProcess:
    """The parent's end: ``fetch(ann) -> (folder, manifest)`` like ``ArtifactFetcher.fetch``,
    run by a child process. Raises Refused or Abandoned."""

    def __init__(self, spec: ChannelSpec, staging_dir: pathlib.Path, trust: Trust, *,
                 rpc_timeout_s: float, backoff_cap_s: float, superseded: Callable[[int], bool],
                 event: Callable[[str, int], None], priority: int | str = 10):
        self.spec = spec
        self.staging_dir = pathlib.Path(staging_dir)
        self.trust = trust
        self.superseded = superseded
        self._event = event
        self.staging_dir = self.staging_dir.resolve()
        self._config = {"channel": dataclasses.asdict(spec), "staging_dir": str(self.staging_dir),
                        "trust": _trust_json(trust), "rpc_timeout_s": rpc_timeout_s,
                        "backoff_cap_s": backoff_cap_s, "priority": priority}
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self._closed = False
        self.resumed_bytes = 0
        self.starts = 0

    def start(self) -> None:
        """Start the child (again, if it died); the first fetch does it when not done before."""
        with self._lock:
            if self._closed:
                raise Abandoned()
            if self._proc is None or self._proc.poll() is not None:
                self._spawn()

    def _spawn(self) -> None:
        root = str(pathlib.Path(__file__).resolve().parent.parent)  # runtime/'s parent
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, TETHER_FETCH_CONFIG=json.dumps(self._config),
                   PYTHONPATH=root + (os.pathsep + path if path else ""))
        self._proc = subprocess.Popen([sys.executable, "-m", "runtime.fetch_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buf = b""
        self.starts += 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (it abandons a fetch in flight) and start no other."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the child's cue to stop; a fetch waiting on it sees it end
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc else None

    def describe(self) -> str:
        """For the robot's status: where fetches run."""
        pid = self.pid
        return (f"{f'process {pid}' if pid else 'a process (stopped)'} at priority "
                f"{self._config['priority']} (started {self.starts} times)")

    def fetch(self, rpc, ann: pb.VersionAnnouncement) -> tuple[pathlib.Path, Manifest]:
        """``rpc`` is unused (the child has its own channel): the signature matches
        ``ArtifactFetcher.fetch``."""
        version = int(ann.version)
        deaths = 0
        while True:
            if self.superseded(version):
                raise Abandoned()
            self.start()
            try:
                proc = self._proc
                _send(proc, {"fetch": base64.b64encode(ann.SerializeToString()).decode()})
                reply = self._wait(proc, version)
            except _ChildDied as e:
                if self._closed or self.superseded(version):
                    raise Abandoned() from None
                deaths += 1
                if deaths >= MAX_DEATHS:
                    raise Refused(f"the fetch process died {deaths} times fetching version "
                                  f"{version} (last: {e})") from None
                self._event(f"fetch process died ({e}); starting it again", logging.WARNING)
                time.sleep(0.2 * deaths)
                continue
            if "abandoned" in reply:
                raise Abandoned()
            if "refused" in reply:
                raise Refused(str(reply["refused"]))
            folder = pathlib.Path(reply["done"])
            if folder.parent != self.staging_dir or folder.name != f"v{version}":
                raise Refused(f"the fetch process staged version {version} in {folder}")
            self.resumed_bytes = int(reply.get("resumed_bytes", self.resumed_bytes))
            return folder, check_manifest(ann, folder, self.trust)

    def _wait(self, proc: subprocess.Popen | None, version: int) -> dict:
        """Forward the child's events until its answer about ``version``; meanwhile tell it
        to abandon the fetch once ``superseded(version)``."""
        abandoned = False
        while True:
            for line in self._lines(proc):
                msg = json.loads(line)
                if "event" in msg:
                    self._event(str(msg["event"]), int(msg.get("level", logging.INFO)))
                elif msg.get("version") == version:
                    return msg
            if not abandoned and self.superseded(version):
                _send(proc, {"abandon": version})
                abandoned = True

    def _lines(self, proc: subprocess.Popen | None) -> list[bytes]:
        """Whole lines the child wrote within POLL_S; raises _ChildDied at its end of file."""
        try:
            fd = proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], POLL_S)
            data = os.read(fd, 1 << 16) if ready else None
        except (OSError, ValueError, AttributeError) as e:  # closed under us by close()
            raise _ChildDied(f"its output is gone: {e}") from None
        if data == b"":
            raise _ChildDied(f"exit status {proc.wait()}")
        if data:
            self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return lines


def _send(proc: subprocess.Popen | None, msg: dict) -> None:
    try:
        proc.stdin.write(json.dumps(msg).encode() + b"\n")
        proc.stdin.flush()
    except (OSError, ValueError, AttributeError) as e:
        raise _ChildDied(f"cannot write to it: {e}") from None


class _ChildDied(Exception):
    pass


# -- the child ---------------------------------------------------------------------------------
def main() -> int:
    config = json.loads(os.environ["TETHER_FETCH_CONFIG"])
    got = lower_process_priority(config["priority"])  # before gRPC starts its threads
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s fetch-process %(levelname)s %(message)s")
    from runtime.fetch import ArtifactFetcher, fetch_rpc
    out_lock = threading.Lock()

    def reply(msg: dict) -> None:
        with out_lock:
            sys.stdout.buffer.write(json.dumps(msg).encode() + b"\n")
            sys.stdout.buffer.flush()

    stop = threading.Event()
    abandon: set[int] = set()
    work: list[pb.VersionAnnouncement] = []
    cond = threading.Condition()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            msg = json.loads(line)
            with cond:
                if "abandon" in msg:
                    abandon.add(int(msg["abandon"]))
                elif "fetch" in msg:
                    ann = pb.VersionAnnouncement.FromString(base64.b64decode(msg["fetch"]))
                    abandon.discard(int(ann.version))
                    work.append(ann)
                cond.notify_all()
        with cond:  # the parent closed our stdin (or died): stop, cancelling a fetch in flight
            stop.set()
            cond.notify_all()
        channel.close()

    spec = ChannelSpec(**config["channel"])
    channel = spec.channel_factory(KEEP_CONNECTED)(spec.addr)
    # connect now, not at the first announcement: a version's fetch does not wait for the
    # connection and TLS handshake (under SCHED_IDLE on a busy computer that took ~0.5 s of a
    # rollout round), and stays connected between versions (KEEP_CONNECTED)
    grpc.channel_ready_future(channel)
    threading.Thread(target=read_stdin, name="tether-fetch-stdin", daemon=True).start()
    fetcher = ArtifactFetcher(
        pathlib.Path(config["staging_dir"]), _trust_from(config["trust"]),
        rpc_timeout_s=config["rpc_timeout_s"], backoff_cap_s=config["backoff_cap_s"], stop=stop,
        superseded=lambda v: stop.is_set() or v in abandon,
        event=lambda m, level=logging.INFO: reply({"event": m, "level": level}))
    reply({"event": f"fetch process {os.getpid()} started ({got})", "level": logging.DEBUG})
    rpc = fetch_rpc(channel)
    while True:
        with cond:
            cond.wait_for(lambda: stop.is_set() or work)
            if stop.is_set():
                break
            ann = work.pop(0)
        answer = {"version": ann.version}
        try:
            path, _ = fetcher.fetch(rpc, ann)
            answer.update(done=str(path), resumed_bytes=fetcher.resumed_bytes)
        except Abandoned:
            answer.update(abandoned=True)
        except Refused as e:
            answer.update(refused=str(e))
        except Exception as e:  # a bug refuses the version, as in the in-process fetcher
            answer.update(refused=f"unexpected {type(e).__name__} in the fetch process: {e}")
        reply(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
