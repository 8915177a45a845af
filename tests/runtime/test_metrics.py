import urllib.request

from runtime.metrics import MetricsServer, render

STATUS = {"robot_id": "r1", "policy_version": 3, "spool_pending": 7, "queue_depth": 5,
          "control": {"ticks": 100, "deadline_misses": 1, "stall_ticks": 2, "jitter_p50_ms": 0.1,
                      "jitter_p99_ms": 0.9, "jitter_max_ms": 2.0},
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
                   'tether_inference_stage_ms{robot="r1",stage="infer",q="p50"} 1.2'):
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
