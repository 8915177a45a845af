"""ROS 2 on the wire without a ROS installation: the node's I/O over cyclonedds.

Topics are named as rmw_cyclonedds names them (``/joint_states`` -> ``rt/joint_states``), types
carry ROS 2 type names (``sensor_msgs::msg::dds_::JointState_``), final extensibility and XCDR1,
and the QoS profiles match what ROS 2 nodes use (sensor data best effort, commands reliable), so
``ros2 topic echo`` on the same ``ROS_DOMAIN_ID`` sees this node and a ros2_control controller
takes its trajectories. Needs ``pip install 'tether[dds]'``.

To keep traffic on one machine (tests), point ``CYCLONEDDS_URI`` at the loopback interface:
``LOOPBACK_URI`` below.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from cyclonedds.core import Listener, Policy, Qos
from cyclonedds.domain import DomainParticipant
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration

from runtime.ros import msgs

log = logging.getLogger(__name__)

LOOPBACK_URI = ("<CycloneDDS><Domain><General><Interfaces><NetworkInterface name=\"lo\"/>"
                "</Interfaces><AllowMulticast>false</AllowMulticast></General><Discovery>"
                "<Peers><Peer address=\"127.0.0.1\"/></Peers><ParticipantIndex>auto"
                "</ParticipantIndex><MaxAutoParticipantIndex>60</MaxAutoParticipantIndex>"
                "</Discovery></Domain></CycloneDDS>")

_XCDR1 = Policy.DataRepresentation(use_cdrv0_representation=True)
QOS = {
    "sensor": Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(2),
                  Policy.Durability.Volatile, _XCDR1),
    "command": Qos(Policy.Reliability.Reliable(duration(milliseconds=100)),
                   Policy.History.KeepLast(1), Policy.Durability.Volatile, _XCDR1),
    "latched": Qos(Policy.Reliability.Reliable(duration(milliseconds=100)),
                   Policy.History.KeepLast(1), Policy.Durability.TransientLocal, _XCDR1),
    "status": Qos(Policy.Reliability.Reliable(duration(milliseconds=100)),
                  Policy.History.KeepLast(10), Policy.Durability.Volatile, _XCDR1),
}


def dds_topic(name: str, namespace: str = "/") -> str:
    """The DDS topic of a ROS 2 topic name (relative names resolve under ``namespace``)."""
    if not name.startswith("/"):
        name = namespace.rstrip("/") + "/" + name
    return "rt" + name


class _OnData(Listener):
    def __init__(self, callback: Callable, datatype: type):
        super().__init__()
        self._callback, self._type = callback, datatype

    def on_data_available(self, reader) -> None:
        for sample in reader.take(N=32):
            if isinstance(sample, self._type):
                try:
                    self._callback(sample)
                except Exception:  # a bad message must not kill DDS's listener thread
                    log.exception("dds: callback on %s failed", reader.topic.name)


class DdsTransport:
    """The node's ``Transport`` over one DDS participant (domain: ``ROS_DOMAIN_ID`` or 0)."""
    msg = msgs

    def __init__(self, domain_id: int | None = None, namespace: str = "/"):
        if domain_id is None:
            domain_id = int(os.environ.get("ROS_DOMAIN_ID", "0"))
        self.domain_id, self.namespace = domain_id, namespace
        self.participant = DomainParticipant(domain_id)
        self._topics: dict[str, Topic] = {}
        self._entities: list = []

    def now(self) -> float:
        return time.time()

    def level(self, value: int) -> int:
        return int(value)

    def _topic(self, kind: str, name: str) -> Topic:
        dds_name = dds_topic(name, self.namespace)
        if dds_name not in self._topics:
            self._topics[dds_name] = Topic(self.participant, dds_name, msgs.KINDS[kind])
        return self._topics[dds_name]

    def subscribe(self, kind: str, topic: str, profile: str, callback: Callable) -> DataReader:
        reader = DataReader(self.participant, self._topic(kind, topic), qos=QOS[profile],
                            listener=_OnData(callback, msgs.KINDS[kind]))
        self._entities.append(reader)
        return reader

    def publisher(self, kind: str, topic: str, profile: str) -> Callable[[object], None]:
        writer = DataWriter(self.participant, self._topic(kind, topic), qos=QOS[profile])
        self._entities.append(writer)
        return writer.write

    def close(self) -> None:
        """Delete readers and writers (the participant stays for a later configure)."""
        for entity in self._entities:
            entity.__del__()  # cyclonedds keeps a registry reference: delete explicitly
        self._entities.clear()

    def shutdown(self) -> None:
        self.close()
        for topic in self._topics.values():
            topic.__del__()
        self._topics.clear()
        self.participant.__del__()
