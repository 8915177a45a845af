"""ROS 2 message types for the cyclonedds transport, as rmw_cyclonedds puts them on the wire.

Each class mirrors one ``.msg`` definition: the same fields in the same order, the DDS type name
``pkg::msg::dds_::Type_``, final extensibility and plain CDR (XCDR1), which is what a ROS 2 node
(any rmw) reads and writes. Field names match the ROS messages, so code that reads or builds a
message works on these classes and on rclpy's alike (see ``runtime/ros/convert.py``).

Needs ``cyclonedds`` (``pip install 'tether[dds]'``); only the DDS transport imports this module.
"""

from dataclasses import dataclass, field

from cyclonedds.idl import IdlStruct
from cyclonedds.idl.annotations import final
from cyclonedds.idl.types import byte, float64, int32, sequence, uint8, uint32


def _ros(pkg: str, name: str) -> str:
    return f"{pkg}::msg::dds_::{name}_"


@final
@dataclass
class Time(IdlStruct, typename=_ros("builtin_interfaces", "Time")):
    sec: int32 = 0
    nanosec: uint32 = 0


@final
@dataclass
class Duration(IdlStruct, typename=_ros("builtin_interfaces", "Duration")):
    sec: int32 = 0
    nanosec: uint32 = 0


@final
@dataclass
class Header(IdlStruct, typename=_ros("std_msgs", "Header")):
    stamp: Time = field(default_factory=Time)
    frame_id: str = ""


@final
@dataclass
class String(IdlStruct, typename=_ros("std_msgs", "String")):
    data: str = ""


@final
@dataclass
class MultiArrayDimension(IdlStruct, typename=_ros("std_msgs", "MultiArrayDimension")):
    label: str = ""
    size: uint32 = 0
    stride: uint32 = 0


@final
@dataclass
class MultiArrayLayout(IdlStruct, typename=_ros("std_msgs", "MultiArrayLayout")):
    dim: sequence[MultiArrayDimension] = field(default_factory=list)
    data_offset: uint32 = 0


@final
@dataclass
class Float64MultiArray(IdlStruct, typename=_ros("std_msgs", "Float64MultiArray")):
    layout: MultiArrayLayout = field(default_factory=MultiArrayLayout)
    data: sequence[float64] = field(default_factory=list)


@final
@dataclass
class Image(IdlStruct, typename=_ros("sensor_msgs", "Image")):
    header: Header = field(default_factory=Header)
    height: uint32 = 0
    width: uint32 = 0
    encoding: str = ""
    is_bigendian: uint8 = 0
    step: uint32 = 0
    data: sequence[uint8] = field(default_factory=list)


@final
@dataclass
class CompressedImage(IdlStruct, typename=_ros("sensor_msgs", "CompressedImage")):
    header: Header = field(default_factory=Header)
    format: str = ""
    data: sequence[uint8] = field(default_factory=list)


@final
@dataclass
class JointState(IdlStruct, typename=_ros("sensor_msgs", "JointState")):
    header: Header = field(default_factory=Header)
    name: sequence[str] = field(default_factory=list)
    position: sequence[float64] = field(default_factory=list)
    velocity: sequence[float64] = field(default_factory=list)
    effort: sequence[float64] = field(default_factory=list)


@final
@dataclass
class JointTrajectoryPoint(IdlStruct, typename=_ros("trajectory_msgs", "JointTrajectoryPoint")):
    positions: sequence[float64] = field(default_factory=list)
    velocities: sequence[float64] = field(default_factory=list)
    accelerations: sequence[float64] = field(default_factory=list)
    effort: sequence[float64] = field(default_factory=list)
    time_from_start: Duration = field(default_factory=Duration)


@final
@dataclass
class JointTrajectory(IdlStruct, typename=_ros("trajectory_msgs", "JointTrajectory")):
    header: Header = field(default_factory=Header)
    joint_names: sequence[str] = field(default_factory=list)
    points: sequence[JointTrajectoryPoint] = field(default_factory=list)


@final
@dataclass
class KeyValue(IdlStruct, typename=_ros("diagnostic_msgs", "KeyValue")):
    key: str = ""
    value: str = ""


@final
@dataclass
class DiagnosticStatus(IdlStruct, typename=_ros("diagnostic_msgs", "DiagnosticStatus")):
    level: byte = 0
    name: str = ""
    message: str = ""
    hardware_id: str = ""
    values: sequence[KeyValue] = field(default_factory=list)


@final
@dataclass
class DiagnosticArray(IdlStruct, typename=_ros("diagnostic_msgs", "DiagnosticArray")):
    header: Header = field(default_factory=Header)
    status: sequence[DiagnosticStatus] = field(default_factory=list)


# the message kinds the node uses, by the name the transports and the node core share
KINDS = {"joint_state": JointState, "image": Image, "compressed_image": CompressedImage,
         "string": String, "trajectory": JointTrajectory, "float64_array": Float64MultiArray,
         "diagnostics": DiagnosticArray}
