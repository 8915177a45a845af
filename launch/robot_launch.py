"""ROS 2 launch: one Tether robot node (a lifecycle node) with its parameters.

    ros2 launch tether robot_launch.py params_file:=/etc/tether/robot.yaml artifact:=/opt/policy

With autostart:=true (default) the launch configures the node (loads and warms up the policy)
and then activates it; with autostart:=false it waits for `ros2 lifecycle set`.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("tether"), "config", "robot.yaml")
    args = [
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ROS 2 parameter file of the node (config/robot.yaml)"),
        DeclareLaunchArgument("artifact", default_value="/opt/tether/policy",
                              description="policy artifact directory"),
        DeclareLaunchArgument("learner", default_value="",
                              description="learner host:port; empty = offline"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate at launch"),
    ]
    node = LifecycleNode(
        package="tether", executable="tether_ros_node", name="tether_robot",
        namespace=LaunchConfiguration("namespace"), output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"artifact": LaunchConfiguration("artifact"),
                     "learner": LaunchConfiguration("learner")}])
    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                            transition_id=Transition.TRANSITION_CONFIGURE),
                          condition=IfCondition(LaunchConfiguration("autostart")))
    activate = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state="inactive",
        entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                              transition_id=Transition.TRANSITION_ACTIVATE))]),
        condition=IfCondition(LaunchConfiguration("autostart")))
    return LaunchDescription([*args, node, activate, configure])
