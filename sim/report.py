"""The fleet run's outputs: ``summary.json`` and ``learning_curve.png``, built from the robots'
status files and the learner's statistics."""
from __future__ import annotations

import json
import pathlib

from runtime.artifact import write_atomic


def aggregate(statuses: list[dict], learner: dict, duration_s: float) -> dict:
    """One summary for the whole fleet (keys as documented in the README)."""
    by_version: dict[str, list[int]] = {}
    for s in statuses:
        for v, (succ, eps) in s.get("success_by_version", {}).items():
            acc = by_version.setdefault(str(v), [0, 0])
            acc[0] += int(succ)
            acc[1] += int(eps)
    ctl = [s.get("control", {}) for s in statuses]
    ver = [s.get("verifier", {}) for s in statuses]
    return {
        "robots": len(statuses),
        "duration_s": round(duration_s, 1),
        "episodes": sum(int(s.get("episodes", 0)) for s in statuses),
        "successes": sum(int(s.get("successes", 0)) for s in statuses),
        # episodes an operator watched (--supervision; not in episodes/successes) and the
        # human-intervention records its takeovers produced
        "supervised_episodes": sum(int(s.get("supervised_episodes", 0)) for s in statuses),
        "interventions": sum(int(s.get("interventions", 0)) for s in statuses),
        "transitions_sent": sum(int(s.get("records_spooled", 0)) for s in statuses),
        "transitions_acked": sum(int(s.get("records_acked", 0)) for s in statuses),
        "transitions_stored": int(learner.get("records_stored", 0)),
        "transitions_dropped": sum(int(s.get("records_dropped", 0)) for s in statuses),
        "duplicates_dropped": int(learner.get("duplicates_dropped", 0)),
        "versions_published": int(learner.get("versions_published", 0)),
        "latest_version": int(learner.get("latest_version", 0)),
        "versions_deployed_min": min((len(s.get("versions_run", [])) for s in statuses), default=0),
        "versions_deployed_max": max((len(s.get("versions_run", [])) for s in statuses), default=0),
        "success_rate_by_version": {v: round(a[0] / a[1], 3) for v, a in
                                    sorted(by_version.items(), key=lambda kv: int(kv[0])) if a[1]},
        "episodes_by_version": {v: a[1] for v, a in sorted(by_version.items(), key=lambda kv: int(kv[0]))},
        "control": {
            "ticks": sum(int(c.get("ticks", 0)) for c in ctl),
            "deadline_misses": sum(int(c.get("deadline_misses", 0)) for c in ctl),
            "stall_ticks": sum(int(c.get("stall_ticks", 0)) for c in ctl),
            "operator_ticks": sum(int(c.get("operator_ticks", 0)) for c in ctl),
            "verifier_hold_ticks": sum(int(c.get("verifier_hold_ticks", 0)) for c in ctl),
            "jitter_p99_ms": max((float(c.get("jitter_p99_ms", 0.0)) for c in ctl), default=0.0),
        },
        "swap_stall_ticks": sum(int(s.get("swap_stall_ticks", 0)) for s in statuses),
        "swaps": sum(int(s.get("swaps", 0)) for s in statuses),
        "verifier": {
            "chunks_checked": sum(int(v.get("chunks_checked", 0)) for v in ver),
            "chunks_rejected": sum(int(v.get("chunks_rejected", 0)) for v in ver),
            "actions_clamped": sum(int(v.get("actions_clamped", 0)) for v in ver),
        },
        "per_robot": [{k: s.get(k) for k in ("robot_id", "task", "policy_version", "versions_run",
                                             "episodes", "successes", "records_spooled",
                                             "records_acked", "records_dropped")} for s in statuses],
    }


def learning_curve(samples: list[tuple[float, int, int]], bin_s: float) -> list[list[float]]:
    """Fleet success rate per time bin, ``[t_end, rate, episodes]``, from cumulative
    (t, episodes, successes) samples. A short tail (under half a bin) joins the last bin."""
    edges, last_t = [(0.0, 0, 0)], 0.0
    for t, eps, succ in samples:
        if t - last_t >= bin_s and eps > edges[-1][1]:
            edges.append((t, eps, succ))
            last_t = t
    if samples and samples[-1][1] > edges[-1][1]:
        tail = samples[-1]
        if len(edges) > 1 and tail[0] - edges[-1][0] < bin_s / 2:
            edges[-1] = tail
        else:
            edges.append(tail)
    return [[round(b[0], 1), round((b[2] - a[2]) / (b[1] - a[1]), 3), b[1] - a[1]]
            for a, b in zip(edges, edges[1:])]


def write_outputs(out: pathlib.Path, summary: dict, curve: list, publishes: list) -> None:
    summary = dict(summary, learning_curve=curve, version_times=publishes)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
    plot_curve(out / "learning_curve.png", curve, publishes)


def plot_curve(path: pathlib.Path, curve: list, publishes: list) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on robots or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label="fleet success rate")
    for t, v in publishes:
        ax.axvline(t, color="grey", alpha=0.4, linestyle="--")
        ax.text(t, 1.02, f"v{v}", fontsize=7, ha="center", transform=ax.get_xaxis_transform())
    ax.set_xlabel("seconds since the fleet started")
    ax.set_ylabel("success rate (episodes ending in the bin)")
    ax.set_ylim(0, 1)
    ax.set_title("Tether fleet: success over time (dashed: versions published)", fontsize=9, pad=14)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
