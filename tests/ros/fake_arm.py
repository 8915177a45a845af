"""A separate process that plays a position-controlled arm over DDS, as a ROS 2 robot would:
publishes sensor_msgs/JointState (100 Hz) and sensor_msgs/Image (30 Hz, 64x64 bgr8, so the node
must convert and resize), takes trajectory_msgs/JointTrajectory and moves the joints to each
point. Every trajectory received is logged as one JSON line to ``--log``.

stdin commands, one per line: ``camera off``, ``camera on``, ``skew SECONDS`` (stamp images that
much in the past), ``quit``. Prints ``ready`` once publishing.
"""
import argparse
import json
import sys
import threading
import time


from robots.description import load_description
from runtime.ros import msgs
from runtime.ros.sensors import to_stamp
from runtime.ros.transport_dds import DdsTransport


def header(t: float) -> msgs.Header:
    sec, nsec = to_stamp(t)
    return msgs.Header(stamp=msgs.Time(sec=sec, nanosec=nsec), frame_id="base")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--domain", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--home", required=True, help="comma-separated start positions")
    a = p.parse_args()
    desc = load_description("arm7_position")
    joints = list(desc.joints)
    pos = [float(x) for x in a.home.split(",")]
    state = {"camera": True, "skew": 0.0, "quit": False, "teleop": None}
    lock = threading.Lock()
    t = DdsTransport(a.domain)
    log = open(a.log, "w", buffering=1)

    def on_trajectory(msg):
        now = time.time()
        point = msg.points[-1]
        with lock:
            pos[:] = [pos[joints.index(n)] if n not in msg.joint_names
                      else point.positions[msg.joint_names.index(n)] for n in joints]
        log.write(json.dumps({"t": now, "names": list(msg.joint_names),
                              "positions": list(point.positions), "n_points": len(msg.points),
                              "tfs": point.time_from_start.sec
                              + 1e-9 * point.time_from_start.nanosec}) + "\n")

    t.subscribe("trajectory", "/joint_trajectory_controller/joint_trajectory", "command",
                on_trajectory)
    pub_js = t.publisher("joint_state", "/joint_states", "sensor")
    pub_img = t.publisher("image", "/camera/front/image_raw", "sensor")
    pub_instr = t.publisher("string", "/tether/instruction", "latched")
    pub_teleop = t.publisher("joint_state", "/tether/teleop", "sensor")
    pub_instr(msgs.String(data="reach the shelf"))
    image = bytes((i * 7) % 256 for i in range(64 * 64 * 3))

    def stdin_reader():
        for line in sys.stdin:
            cmd = line.split()
            with lock:
                if cmd == ["camera", "off"]:
                    state["camera"] = False
                elif cmd == ["camera", "on"]:
                    state["camera"] = True
                elif cmd[:1] == ["skew"]:
                    state["skew"] = float(cmd[1])
                elif cmd == ["teleop", "off"]:
                    state["teleop"] = None
                elif cmd[:1] == ["teleop"]:  # an operator holds the arm at this position
                    state["teleop"] = float(cmd[1])
                elif cmd == ["quit"]:
                    state["quit"] = True
        state["quit"] = True

    threading.Thread(target=stdin_reader, daemon=True).start()
    print("ready", flush=True)
    k = 0
    while not state["quit"]:
        now = time.time()
        with lock:
            positions, camera, skew = list(pos), state["camera"], state["skew"]
            teleop = state["teleop"]
        if teleop is not None:
            pub_teleop(msgs.JointState(header=header(now), name=joints, position=[teleop] * 7,
                                       velocity=[], effort=[]))
        pub_js(msgs.JointState(header=header(now), name=joints, position=positions,
                               velocity=[0.0] * 7, effort=[]))
        if camera and k % 3 == 0:
            pub_img(msgs.Image(header=header(now - skew), height=64, width=64, encoding="bgr8",
                               is_bigendian=0, step=64 * 3, data=image))
        k += 1
        time.sleep(0.01)
    log.close()
    t.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
