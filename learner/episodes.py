"""Complete episodes out of the store, with a position that survives a learner restart.

The store hands out records in insertion order (``read(after_rowid, limit)``); robots stream
episodes interleaved, so records wait in ``pending`` until their episode ends. The trainer's
checkpoint keeps the cursor plus the keys of every episode it still holds (pending, ready,
replay) and the smallest rowid among them: a new trainer re-reads from there, keeps only the
records of those episodes up to the old cursor, and carries on. Nothing is lost (pending
episodes come back) and nothing is trained twice (episodes already consumed are skipped).
"""
from __future__ import annotations

import collections
import dataclasses
import logging

from learner.batches import check_record
from tether.wire import tether_pb2 as pb

log = logging.getLogger("tether.learner.episodes")

Key = tuple[str, str]  # (robot_id, episode_id)


@dataclasses.dataclass
class Episode:
    key: Key
    first_rowid: int
    records: list[pb.ChunkRecord]

    def sort(self) -> "Episode":
        self.records.sort(key=lambda r: r.seq)
        return self

    @property
    def oldest_version(self) -> int:
        return min(r.policy_version for r in self.records)

    @property
    def success(self) -> bool:
        return any(r.success for r in self.records)


def _keys(episodes) -> list[list[str]]:
    return [list(e.key) for e in episodes]


class EpisodeFeed:
    def __init__(self, store, read_limit: int = 512, max_pending_records: int = 50_000):
        self.store = store
        self.read_limit = read_limit
        self.max_pending_records = max_pending_records
        self.cursor = 0  # last rowid read
        self.pending: collections.OrderedDict[Key, Episode] = collections.OrderedDict()
        self.pending_records = 0

    def _add(self, rowid: int, r: pb.ChunkRecord) -> Episode | None:
        """Add one record; returns its episode if this record ended it."""
        key = (r.robot_id, r.episode_id)
        ep = self.pending.get(key)
        if ep is None:
            ep = self.pending[key] = Episode(key, rowid, [])
        ep.records.append(r)
        self.pending_records += 1
        if r.terminated or r.truncated:
            del self.pending[key]
            self.pending_records -= len(ep.records)
            return ep.sort()
        return None

    def poll(self) -> tuple[int, list[Episode], int]:
        """(records read, episodes completed, records dropped because too many were pending)."""
        rows = self.store.read(self.cursor, self.read_limit)
        done = []
        for rowid, r in rows:
            self.cursor = rowid
            ep = self._add(rowid, r)
            if ep is not None:
                done.append(ep)
        dropped = 0
        while self.pending_records > self.max_pending_records:
            key, ep = self.pending.popitem(last=False)
            self.pending_records -= len(ep.records)
            dropped += len(ep.records)
            log.warning("dropped incomplete episode %s (%d records): pending limit %d", key,
                        len(ep.records), self.max_pending_records)
        return len(rows), done, dropped

    def drop_pending(self, useless) -> int:
        """Forget pending episodes for which ``useless(episode)`` holds (e.g. already too stale
        to train whenever they end); returns the records dropped."""
        gone = [k for k, ep in self.pending.items() if useless(ep)]
        n = 0
        for k in gone:
            ep = self.pending.pop(k)
            n += len(ep.records)
        self.pending_records -= n
        return n

    # -- checkpoint --------------------------------------------------------------------------
    def position(self, ready, replay) -> dict:
        """Plain data (ints, strings) that ``restore`` turns back into this feed's state."""
        held = list(self.pending.values()) + list(ready) + list(replay)
        reread = min((e.first_rowid for e in held), default=self.cursor + 1) - 1
        return {"cursor": int(self.cursor), "reread_from": int(reread),
                "pending": _keys(self.pending.values()), "ready": _keys(ready),
                "replay": _keys(replay)}

    def restore(self, position: dict) -> tuple[list[Episode], list[Episode]]:
        """Re-read the store up to the checkpointed cursor; returns (ready, replay) episodes in
        their checkpointed order and leaves the pending ones in this feed."""
        cursor = int(position["cursor"])
        wanted = {tuple(k): group for group in ("pending", "ready", "replay")
                  for k in position[group]}
        found: dict[Key, Episode] = {}
        at = int(position["reread_from"])
        while at < cursor:
            rows = self.store.read(at, self.read_limit)
            if not rows:
                break
            for rowid, r in rows:
                if rowid > cursor:
                    break
                key = (r.robot_id, r.episode_id)
                if key in wanted:
                    ep = found.setdefault(key, Episode(key, rowid, []))
                    ep.records.append(r)
            at = rows[-1][0]
        missing = [k for k in wanted if k not in found]
        if missing:  # the store lost data it had acknowledged: say so, carry on without them
            log.error("resume: %d episodes of the checkpoint are not in the store (e.g. %s)",
                      len(missing), missing[0])
        self.cursor = cursor
        self.pending.clear()
        self.pending_records = 0
        for k in position["pending"]:
            if tuple(k) in found:
                ep = found[tuple(k)].sort()
                self.pending[ep.key] = ep
                self.pending_records += len(ep.records)
        pick = lambda group: [found[tuple(k)].sort() for k in position[group] if tuple(k) in found]
        return pick("ready"), pick("replay")


def group_episodes(records: list[pb.ChunkRecord]) -> list[list[pb.ChunkRecord]]:
    """Records grouped by (robot, episode), each sorted by seq, in first-seen order."""
    groups: dict[Key, list] = {}
    for r in records:
        groups.setdefault((r.robot_id, r.episode_id), []).append(r)
    return [sorted(g, key=lambda r: r.seq) for g in groups.values()]


def usable_episodes(records: list[pb.ChunkRecord], spec, version: int, staleness: int):
    """(episodes the model can train on, Counter of records dropped by why). Whole episodes
    only: a gap would corrupt the returns of every earlier chunk."""
    keep, dropped = [], collections.Counter()
    for episode in group_episodes(records):
        why = next((w for w in (check_record(r, spec) for r in episode) if w), None)
        if why is not None:
            dropped["unusable"] += len(episode)
            log.debug("skipping episode %s/%s: %s", episode[0].robot_id, episode[0].episode_id, why)
        elif any(version - r.policy_version > staleness for r in episode):
            dropped["stale"] += len(episode)
        else:
            keep.append(episode)
    return keep, dropped
