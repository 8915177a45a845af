"""ROS 2 launch: the Tether learner service (`tether learner`) as a managed process.

    ros2 launch tether learner_launch.py addr:=0.0.0.0:50051 data:=/var/lib/tether
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    args = [
        DeclareLaunchArgument("addr", default_value="127.0.0.1:50051",
                              description="host:port the learner's gRPC server binds"),
        DeclareLaunchArgument("data", default_value="tether-learner",
                              description="directory of the experience store and weight registry"),
        DeclareLaunchArgument("init_artifact", description="initial policy artifact directory"),
        DeclareLaunchArgument("publish_interval", default_value="25.0",
                              description="seconds between published versions (at least)"),
    ]
    learner = ExecuteProcess(
        cmd=["tether", "learner", "--addr", LaunchConfiguration("addr"),
             "--data", LaunchConfiguration("data"),
             "--init-artifact", LaunchConfiguration("init_artifact"),
             "--publish-interval", LaunchConfiguration("publish_interval")],
        output="screen", name="tether_learner")
    return LaunchDescription([*args, learner])
