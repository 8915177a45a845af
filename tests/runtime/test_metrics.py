import urllib.request

from runtime.metrics import MetricsServer, render

STATUS = {"robot_id": "r1", "policy_version": 3, "spool_pending": 7, "queue_depth": 5,
          "control": {"ticks": 100, "deadline_misses": 1, "stall_ticks": 2, "jitter_p50_ms": 0.1,
                      "jitter_p99_ms": 0.9, "jitter_max_ms": 2.0, "gate_wait_ticks": 4,
                      "hold_reason": "state not finite",
                      "observation_holds": {"state not finite": 6, "stale observation": 2}},
          "inference": {"latency_p50_ms": 1.5, "latency_p95_ms": 3.0, "chunks": 12, "errors": 0,
                        "delay_ticks": 2, "stages": {"infer": {"p50_ms": 1.2}},
                        "backend": {"name": "ort", "device": "cpu",
                                    "providers": ["CPUExecutionProvider"]}}}


def test_render_has_every_figure():
    text = render(STATUS)
    for needle in ('tether_control_jitter_ms{robot="r1",q="p99"} 0.9',
                   'tether_control_stall_ticks_total{robot="r1"} 2',
                   'tether_policy_version{robot="r1"} 3', 'tether_spool_depth{robot="r1"} 7',
                   'tether_queue_depth{robot="r1"} 5', 'providers="CPUExecutionProvider"',
                   'tether_inference_stage_ms{robot="r1",stage="infer",q="p50"} 1.2',
                   'tether_control_gate_wait_ticks_total{robot="r1"} 4',
                   'tether_control_holding{robot="r1",reason="state not finite"} 1',
                   'tether_control_observation_holds_total{robot="r1",'
                   'reason="stale observation"} 2'):
        assert needle in text


def test_server_serves_metrics_and_404s_elsewhere():
    server = MetricsServer(lambda: STATUS, port=0).start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read()
        assert b"tether_control_ticks_total" in body
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        server.stop()


def test_render_has_the_verifiers_decisions_and_the_envelopes_clamps():
    status = dict(STATUS, verifier={
        "chunks_checked": 40, "chunks_rejected": 2, "candidates": 2560, "resample_rounds": 5,
        "veto_overrides": 1, "time_p50_ms": 0.21, "time_p99_ms": 0.4, "veto_disabled": True,
        "chosen_p_safe_mean": 0.93,
        "by_reason": {"actions_clamped": 9, "interventions": 3, "by_velocity": 4}})
    text = render(status)
    for needle in ('tether_verifier_chunks_checked_total{robot="r1"} 40',
                   'tether_verifier_chunks_rejected_total{robot="r1"} 2',
                   'tether_verifier_resample_rounds_total{robot="r1"} 5',
                   'tether_verifier_veto_overrides_total{robot="r1"} 1',
                   'tether_verifier_time_ms{robot="r1",q="p99"} 0.4',
                   'tether_verifier_veto_disabled{robot="r1"} 1',
                   'tether_verifier_chosen_p_safe_mean{robot="r1"} 0.93',
                   'tether_envelope_interventions_total{robot="r1"} 3',
                   'tether_envelope_clamps_total{robot="r1",reason="velocity"} 4'):
        assert needle in text, needle
