"""ROS 2 launch: a simulated Tether fleet with its learner (`tether fleet`).

    ros2 launch tether sim_fleet_launch.py robots:=4 minutes:=3
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    args = [
        DeclareLaunchArgument("robots", default_value="4", description="simulated robots"),
        DeclareLaunchArgument("minutes", default_value="3", description="control time per robot"),
        DeclareLaunchArgument("out", default_value="runs/fleet", description="output directory"),
    ]
    fleet = ExecuteProcess(
        cmd=["tether", "fleet", "--robots", LaunchConfiguration("robots"),
             "--minutes", LaunchConfiguration("minutes"), "--out", LaunchConfiguration("out")],
        output="screen", name="tether_fleet")
    return LaunchDescription([*args, fleet])
