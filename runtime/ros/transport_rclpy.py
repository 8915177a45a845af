"""The ROS 2 lifecycle node (rclpy): parameters declared with descriptions, the node's I/O on
rclpy publishers and subscriptions; everything else is ``RosNodeCore``, shared with the
cyclonedds transport.

    ros2 launch tether robot_launch.py params_file:=/path/robot.yaml
    ros2 lifecycle set /tether_robot configure   # loads and warms up the policy
    ros2 lifecycle set /tether_robot activate    # starts commanding

Needs a ROS 2 installation (rclpy is not on PyPI); the console script is ``tether_ros_node``.
"""
from __future__ import annotations

import sys
import types

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from builtin_interfaces.msg import Duration, Time
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray, Header, MultiArrayLayout, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from runtime.ros.node_core import RosNodeCore
from runtime.ros.params import DESCRIPTIONS, RosParams, defaults

KINDS = {"joint_state": JointState, "image": Image, "compressed_image": CompressedImage,
         "string": String, "trajectory": JointTrajectory, "float64_array": Float64MultiArray,
         "diagnostics": DiagnosticArray}
_R, _H, _D = ReliabilityPolicy, HistoryPolicy, DurabilityPolicy
QOS = {
    "sensor": QoSProfile(reliability=_R.BEST_EFFORT, history=_H.KEEP_LAST, depth=2,
                         durability=_D.VOLATILE),
    "command": QoSProfile(reliability=_R.RELIABLE, history=_H.KEEP_LAST, depth=1,
                          durability=_D.VOLATILE),
    "latched": QoSProfile(reliability=_R.RELIABLE, history=_H.KEEP_LAST, depth=1,
                          durability=_D.TRANSIENT_LOCAL),
    "status": QoSProfile(reliability=_R.RELIABLE, history=_H.KEEP_LAST, depth=10,
                         durability=_D.VOLATILE),
}
MSG = types.SimpleNamespace(
    Time=Time, Duration=Duration, Header=Header, JointTrajectory=JointTrajectory,
    JointTrajectoryPoint=JointTrajectoryPoint, Float64MultiArray=Float64MultiArray,
    MultiArrayLayout=MultiArrayLayout, DiagnosticArray=DiagnosticArray,
    DiagnosticStatus=DiagnosticStatus, KeyValue=KeyValue)


class RclpyTransport:
    msg = MSG

    def __init__(self, node):
        self.node = node
        self._subs, self._pubs = [], []

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def level(self, value: int) -> bytes:
        return bytes([int(value)])

    def subscribe(self, kind, topic, profile, callback):
        sub = self.node.create_subscription(KINDS[kind], topic, callback, QOS[profile])
        self._subs.append(sub)
        return sub

    def publisher(self, kind, topic, profile):
        pub = self.node.create_publisher(KINDS[kind], topic, QOS[profile])
        self._pubs.append(pub)
        return pub.publish

    def close(self) -> None:
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        for pub in self._pubs:
            self.node.destroy_publisher(pub)
        self._subs, self._pubs = [], []


class TetherLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = "tether_robot", **kwargs):
        super().__init__(node_name, **kwargs)
        for name, default in defaults().items():
            self.declare_parameter(name, default,
                                   ParameterDescriptor(description=DESCRIPTIONS[name]))
        self.core: RosNodeCore | None = None

    def params(self) -> RosParams:
        return RosParams.from_mapping({n: self.get_parameter(n).value for n in defaults()})

    def _transition(self, action) -> TransitionCallbackReturn:
        try:
            action()
        except Exception as e:
            self.get_logger().error(f"{type(e).__name__}: {e}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state) -> TransitionCallbackReturn:
        def configure():
            self.core = RosNodeCore(self.params(), RclpyTransport(self), self.get_name())
            self.core.configure()
        return self._transition(configure)

    def on_activate(self, state) -> TransitionCallbackReturn:
        return self._transition(self.core.activate)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        return self._transition(self.core.deactivate)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        return self._transition(self.core.cleanup)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        return self._transition(self.core.shutdown if self.core else (lambda: None))

    def on_error(self, state) -> TransitionCallbackReturn:
        return self._transition(self.core.shutdown if self.core else (lambda: None))


def main(args=None) -> int:
    rclpy.init(args=args)
    node = TetherLifecycleNode()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except KeyboardInterrupt:
        pass
    finally:
        if node.core is not None:
            node.core.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
