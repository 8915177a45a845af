"""A TCP fault proxy between robots and the learner: it forwards bytes, and on command (or at
random, seeded, from ``chaos``) cuts connections with a TCP reset (at a random moment, or just
as the learner replies, so that an ack is lost), drops new connections, delays bytes, and
partitions the network for a few seconds (everything cut and refused, or everything
silently held: a black hole, which only the robots' own timeouts can notice).

It is plain TCP, so gRPC (and TLS, if used) passes through untouched. Threads, one pair per
connection: a handful of robots, each with two or three HTTP/2 connections.
"""
from __future__ import annotations

import dataclasses
import random
import select
import socket
import struct
import threading
import time

_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, not a FIN


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _carries_message(conn: "_Conn", data: bytes) -> bool:
    """Whether these learner -> robot bytes start an HTTP/2 DATA frame (a gRPC message: an ack,
    an announcement, an artifact chunk), tracking frame boundaries across reads. Plaintext
    only: under TLS the frames cannot be seen, and reply cuts never fire."""
    found, buf = False, conn.header + data
    i = 0
    if conn.frame_left:
        skip = min(conn.frame_left, len(buf))
        conn.frame_left -= skip
        i = skip
    while i < len(buf):
        if len(buf) - i < 9:
            conn.header = buf[i:]
            return found
        length = int.from_bytes(buf[i:i + 3], "big")
        found = found or (buf[i + 3] == 0 and length > 0)  # type 0: DATA
        end = i + 9 + length
        if end > len(buf):
            conn.frame_left = end - len(buf)
            i = len(buf)
        else:
            i = end
    conn.header = b""
    return found


class _Conn:
    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut = threading.Event()
        self.closed = False
        self.delay_until = 0.0
        self.delay_s = 0.0
        self.cut_on_reply = False  # reset instead of forwarding the learner's next message
        self.frame_left = 0        # HTTP/2, learner -> robot: bytes left of the current frame
        self.header = b""          # a frame header split across reads
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


@dataclasses.dataclass
class ProxyStats:
    connections: int = 0     # accepted from robots
    cuts: int = 0            # live connections reset by the proxy
    reply_cuts: int = 0      # of which: reset with the learner's reply (e.g. an ack) withheld
    drops: int = 0           # new connections reset at once
    delays: int = 0          # delay bursts applied to a connection
    partitions: int = 0
    partition_s: float = 0.0
    bytes_up: int = 0        # robot -> learner
    bytes_down: int = 0

    @property
    def injected(self) -> int:
        """Every fault that broke or stalled a connection: cuts, drops and partitions."""
        return self.cuts + self.drops + self.partitions


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", port))
        self._listen.listen(128)
        self.port = self._listen.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.stats = ProxyStats()
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._partition: str | None = None  # None, "refuse" or "blackhole"
        self._drop_p = 0.0
        self._held: list[_Conn] = []      # accepted during a black hole, not yet connected
        self._rng = random.Random(0)
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    # -- forwarding --------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listen], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._listen.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            with self._lock:
                self.stats.connections += 1
                if self._partition == "refuse" or self._rng.random() < self._drop_p:
                    self.stats.drops += 1
                    conn.close()
                    continue
                self._conns.append(conn)
                if self._partition == "blackhole":
                    self._held.append(conn)  # connected upstream when the partition heals
                    continue
            self._connect(conn)

    def _connect(self, conn: _Conn) -> None:
        try:
            conn.upstream = socket.create_connection(self.upstream, timeout=5)
            conn.upstream.settimeout(None)
            conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()  # the learner is down: the robot sees a reset, as without a proxy
            return
        for src, dst, up in ((conn.client, conn.upstream, True), (conn.upstream, conn.client, False)):
            threading.Thread(target=self._pump, args=(conn, src, dst, up), daemon=True,
                             name="proxy-pump").start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not (conn.cut.is_set() or conn.closed or self._stop.is_set()):
                if self._partition == "blackhole":
                    time.sleep(0.02)  # bytes pile up in the kernel buffers, as on a dead route
                    continue
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if not up and _carries_message(conn, data) and conn.cut_on_reply:
                    # the request got through and the reply (for an experience stream, an ack:
                    # the batch is stored) is lost: the robot must resend, the learner must
                    # not store it twice
                    self.stats.cuts += 1
                    self.stats.reply_cuts += 1
                    break
                if conn.delay_until > time.monotonic():
                    time.sleep(conn.delay_s)
                dst.sendall(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except (OSError, ValueError):
            pass
        conn.close()
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    # -- faults ----------------------------------------------------------------------------------
    def live(self) -> int:
        with self._lock:
            return sum(not c.closed for c in self._conns)

    def cut(self, n: int = 1, rng: random.Random | None = None) -> int:
        """Reset up to n random live connections; returns how many were cut."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
        picked = (rng or self._rng).sample(live, min(n, len(live)))
        for c in picked:
            c.cut.set()
            c.close()
        self.stats.cuts += len(picked)
        return len(picked)

    def cut_on_reply(self, n: int = 1, rng: random.Random | None = None) -> None:
        """Arm up to n random live connections: the next bytes the learner sends on them are
        withheld and the connection is reset (counted as a cut when it happens)."""
        with self._lock:
            live = [c for c in self._conns if not c.closed and not c.cut_on_reply]
        for c in (rng or self._rng).sample(live, min(n, len(live))):
            c.cut_on_reply = True

    def delay(self, seconds: float, per_chunk_s: float, rng: random.Random | None = None) -> None:
        """Delay every chunk of bytes of one random connection by per_chunk_s, for seconds."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
        if live:
            c = (rng or self._rng).choice(live)
            c.delay_s, c.delay_until = per_chunk_s, time.monotonic() + seconds
            self.stats.delays += 1

    def drop_new(self, p: float) -> None:
        """Reset each new connection with probability p (0: stop dropping)."""
        self._drop_p = p

    def partition(self, seconds: float, mode: str = "refuse", heal_by_cut: bool = True) -> None:
        """Partition for ``seconds`` (blocking). ``refuse``: every connection reset, new ones
        refused. ``blackhole``: nothing moves in either direction and new connections hang; at
        the heal, held connections are reset (``heal_by_cut``) or simply resume."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"partition mode must be 'refuse' or 'blackhole', got {mode!r}")
        self.stats.partitions += 1
        t0 = time.monotonic()
        self._partition = mode
        if mode == "refuse":
            self.cut(10**6)
        self._stop.wait(seconds)
        if mode == "blackhole" and heal_by_cut:
            self.cut(10**6)
        with self._lock:
            held, self._held = self._held, []
            self._partition = None
        for c in held:
            if not c.closed:
                self._connect(c)
        self.stats.partition_s += time.monotonic() - t0

    def chaos(self, seconds: float, seed: int, mean_gap_s: float = 0.5,
              partition_s: tuple[float, float] = (1.0, 3.0)) -> ProxyStats:
        """Random faults for ``seconds`` (blocking): mostly resets of single connections (some
        timed to withhold the learner's reply), with delay bursts, windows of dropped
        connections and a few full partitions."""
        rng = random.Random(seed)
        self._rng = random.Random(seed + 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._stop.is_set():
            self._stop.wait(rng.uniform(0.2, 2 * mean_gap_s - 0.2))
            kind = rng.choices(("cut", "reply", "delay", "drop", "partition"),
                               (0.35, 0.25, 0.15, 0.13, 0.12))[0]
            left = end - time.monotonic()
            if kind == "cut":
                self.cut(rng.choice((1, 1, 2)), rng)
            elif kind == "reply":
                self.cut_on_reply(rng.choice((1, 2)), rng)
            elif kind == "delay":
                self.delay(rng.uniform(0.5, 2.0), rng.uniform(0.01, 0.3), rng)
            elif kind == "drop":
                self.drop_new(0.7)
                self._stop.wait(min(left, rng.uniform(0.5, 2.0)))
                self.drop_new(0.0)
            elif left > partition_s[0]:
                self.partition(min(left, rng.uniform(*partition_s)),
                               rng.choice(("refuse", "blackhole")), heal_by_cut=rng.random() < 0.5)
        self.drop_new(0.0)
        return self.stats

    def close(self) -> None:
        self._stop.set()
        try:
            self._listen.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
