"""The inference node as a ROS 2 lifecycle node: ``node_core`` (shared logic), two transports
(``transport_rclpy`` with a ROS 2 installation, ``transport_dds`` over cyclonedds for pip-only
robots), ``msgs`` (ROS 2 message types for DDS), ``params`` and ``sensors``."""
