"""Summing up a swarm run from its trainers' reports (``swarm join --report-json``)."""

from __future__ import annotations

import statistics

from swarm.rounds import OUTCOMES

FP32_BYTES = 4


def summarize(reports: list[dict]) -> dict:
    """Global steps, fewest peers in any round, loss first -> last, and wire bytes, over all trainers."""
    rounds = [r for report in reports for r in report["rounds"]]
    losses: dict[int, list[float]] = {}
    for report in reports:
        for step, loss in report["losses"].items():
            losses.setdefault(int(step), []).append(loss)
    steps = sorted(losses)
    grad = [report["wire"]["grad"] for report in reports]
    grad_bytes = sum(channel["sent_bytes"] for channel in grad)
    grad_values = sum(channel["sent_values"] for channel in grad)
    averaged_rounds = sum(r["outcome"] in ("averaged", "partial") for r in rounds)
    num_params = reports[0]["num_params"] if reports else 0
    all_channels = [channel for report in reports for channel in report["wire"].values()]
    sent = sum(channel["sent_bytes"] for channel in all_channels)
    sent_fp32 = FP32_BYTES * sum(channel["sent_values"] for channel in all_channels)
    return dict(
        steps=max(r["final_step"] for r in reports) - min(r["start_step"] for r in reports),
        min_peers_averaged=min((r["group_size"] for r in rounds), default=0),
        rounds={outcome: sum(r["outcome"] == outcome for r in rounds) for outcome in OUTCOMES},
        loss_first=statistics.fmean(losses[steps[0]]) if steps else float("nan"),
        loss_last=statistics.fmean(losses[steps[-1]]) if steps else float("nan"),
        wire_bytes_per_param=grad_bytes / grad_values if grad_values else float("nan"),
        # what one peer sends per averaged round, per parameter: about 2(N-1)/N times the line above
        grad_bytes_per_param_per_round=grad_bytes / (averaged_rounds * num_params) if averaged_rounds else float("nan"),
        bytes_sent=sent,
        bytes_sent_fp32=sent_fp32,
        bytes_saved=sent_fp32 - sent,
        num_params=num_params,
        peers=len(reports),
    )
