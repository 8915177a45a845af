"""The rclpy transport: only where a ROS 2 installation provides rclpy."""
import pytest

pytest.importorskip("rclpy", reason="rclpy comes with a ROS 2 installation (not on PyPI); the "
                                    "same node logic is tested over DDS in test_dds_node.py")

pytestmark = pytest.mark.ros


def test_lifecycle_node_declares_every_parameter_with_a_description():
    import rclpy

    from runtime.ros.params import DESCRIPTIONS, defaults
    from runtime.ros.transport_rclpy import TetherLifecycleNode

    rclpy.init()
    try:
        node = TetherLifecycleNode()
        for name in defaults():
            assert node.describe_parameter(name).description == DESCRIPTIONS[name]
        assert node.params().artifact == ""
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
