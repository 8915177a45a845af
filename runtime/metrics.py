"""The node's figures on a Prometheus text endpoint (``GET /metrics``), standard library only.

``MetricsServer(status_fn, port)`` serves whatever ``status_fn()`` (the node's status dict)
reports at scrape time: tick jitter, deadline misses, stalls, inference latency percentiles,
active backend and providers, policy version, queue depth and spool depth, and the verifier's
decisions (checked, rejected, resampled, overridden, decision time) and the envelope's clamps.
"""
from __future__ import annotations

import http.server
import threading
from typing import Callable


def _line(name: str, value, labels: dict | None = None) -> str:
    lab = ""
    if labels:
        lab = "{" + ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in labels.items()) + "}"
    return f"tether_{name}{lab} {float(value):g}"


def render(status: dict) -> str:
    """Prometheus exposition text for one node status (see runtime/node.py ``status``)."""
    c, inf = status.get("control", {}), status.get("inference", {})
    robot = {"robot": status.get("robot_id", "")}
    lines = [_line("control_ticks_total", c.get("ticks", 0), robot),
             _line("control_deadline_misses_total", c.get("deadline_misses", 0), robot),
             _line("control_stall_ticks_total", c.get("stall_ticks", 0), robot),
             _line("control_verifier_hold_ticks_total", c.get("verifier_hold_ticks", 0), robot)]
    for q in ("p50", "p99", "max"):
        lines.append(_line("control_jitter_ms", c.get(f"jitter_{q}_ms", 0), {**robot, "q": q}))
    lines.append(_line("control_gate_wait_ticks_total", c.get("gate_wait_ticks", 0), robot))
    lines.append(_line("control_holding", bool(c.get("hold_reason")),
                       {**robot, "reason": c.get("hold_reason") or ""}))
    for reason, n in (c.get("observation_holds") or {}).items():
        lines.append(_line("control_observation_holds_total", n, {**robot, "reason": reason}))
    for q in ("p50", "p95"):
        lines.append(_line("inference_latency_ms", inf.get(f"latency_{q}_ms", 0),
                           {**robot, "q": q}))
    for stage, qs in inf.get("stages", {}).items():
        for q, v in qs.items():
            lines.append(_line("inference_stage_ms", v, {**robot, "stage": stage,
                                                         "q": q.replace("_ms", "")}))
    backend = inf.get("backend", {})
    lines.append(_line("backend_info", 1, {**robot, "backend": backend.get("name", ""),
                                           "device": backend.get("device", ""),
                                           "providers": ",".join(backend.get("providers", []))}))
    lines += [_line("inference_chunks_total", inf.get("chunks", 0), robot),
              _line("inference_errors_total", inf.get("errors", 0), robot),
              _line("inference_delay_ticks", inf.get("delay_ticks", 0), robot),
              _line("policy_version", status.get("policy_version", 0), robot),
              _line("queue_depth", status.get("queue_depth", 0), robot),
              _line("spool_depth", status.get("spool_pending", 0), robot)]
    lines += _verifier_lines(status.get("verifier", {}), robot)
    return "\n".join(lines) + "\n"


_VERIFIER_COUNTERS = ("chunks_checked", "chunks_rejected", "candidates", "candidates_rejected",
                      "resample_rounds", "veto_overrides")


def _verifier_lines(v: dict, robot: dict) -> list[str]:
    """The verifier's decisions (scheduler counters, decision time) and the envelope's
    interventions by reason."""
    lines = [_line(f"verifier_{k}_total", v.get(k, 0), robot) for k in _VERIFIER_COUNTERS]
    for q in ("p50", "p99"):
        lines.append(_line("verifier_time_ms", v.get(f"time_{q}_ms", 0), {**robot, "q": q}))
    if v.get("chosen_p_safe_mean") is not None:
        lines.append(_line("verifier_chosen_p_safe_mean", v["chosen_p_safe_mean"], robot))
    lines.append(_line("verifier_veto_disabled", bool(v.get("veto_disabled")), robot))
    env = v.get("by_reason", {})
    lines.append(_line("envelope_actions_clamped_total", env.get("actions_clamped", 0), robot))
    lines.append(_line("envelope_interventions_total", env.get("interventions", 0), robot))
    for key, n in env.items():
        if key.startswith("by_"):
            lines.append(_line("envelope_clamps_total", n, {**robot, "reason": key[3:]}))
    return lines


class MetricsServer:
    def __init__(self, status_fn: Callable[[], dict], port: int = 0, host: str = "127.0.0.1"):
        status = status_fn

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render(status()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="tether-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
