"""ROS 2 launch: the Tether learner service (`tether learner`) as a managed process.

    ros2 launch tether learner_launch.py addr:=0.0.0.0:50051 data:=/var/lib/tether \
        tls_cert:=/etc/tether/learner/cert.pem tls_key:=/etc/tether/learner/key.pem \
        tls_ca:=/etc/tether/learner/ca.pem

Robots connect over mutual TLS (files from `tether certs learner`); there is no plaintext
option here: run `tether learner --insecure` by hand for local development.
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
        DeclareLaunchArgument("tls_cert", description="the learner's certificate (PEM)"),
        DeclareLaunchArgument("tls_key", description="its private key (PEM, mode 600)"),
        DeclareLaunchArgument("tls_ca", description="the fleet CA certificate (PEM)"),
    ]
    learner = ExecuteProcess(
        cmd=["tether", "learner", "--addr", LaunchConfiguration("addr"),
             "--data", LaunchConfiguration("data"),
             "--init-artifact", LaunchConfiguration("init_artifact"),
             "--publish-interval", LaunchConfiguration("publish_interval"),
             "--tls-cert", LaunchConfiguration("tls_cert"),
             "--tls-key", LaunchConfiguration("tls_key"),
             "--tls-ca", LaunchConfiguration("tls_ca")],
        output="screen", name="tether_learner")
    return LaunchDescription([*args, learner])
